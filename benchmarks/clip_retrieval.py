"""Top-1 image -> caption retrieval of a CLIP folder on the embedded shapes data: for every image of a split,
is its own caption the nearest (cosine) among the split's distinct captions? ``heldout``: colour / shape /
background combinations no training split contains; ``val``: unseen images of the training combinations.

    python benchmarks/clip_retrieval.py --clip logs/clip/runs/<run>/clip
    python benchmarks/clip_retrieval.py --clip <clip folder> --splits heldout --n 512

Any ``CLIPModel`` folder with its processor works (``experiment=clip`` writes one as ``<run>/clip``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.shapes import ShapesDataset
from ldm.modules.shapes_clip import retrieval_accuracy
from ldm.modules.subject_metrics import SubjectMetrics
from ldm.utils.task import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="a local CLIPModel folder with its processor")
    p.add_argument("--splits", default="val,heldout", help="comma-separated shapes splits")
    p.add_argument("--n", type=int, default=256, help="images per split")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the shapes data's seed (as trained)")
    return p.parse_args(argv)


@torch.no_grad()
def split_accuracy(metrics: SubjectMetrics, split: str, n: int, resolution: int, seed: int) -> dict:
    data = ShapesDataset(n, resolution, seed, split)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([torch.as_tensor(item["image"]) for item in items])
    captions = [item["caption"] for item in items]
    features = F.normalize(
        torch.cat([metrics.clip_image_features(images[i : i + 64]) for i in range(0, n, 64)])
    )

    def text_of(prompts: list[str]) -> torch.Tensor:
        return F.normalize(metrics.clip_text_features(prompts), dim=-1)

    distinct = len(set(captions))
    return {
        "top1": retrieval_accuracy(features, captions, text_of),
        "captions": distinct,
        "chance": 1 / distinct,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    metrics = SubjectMetrics.from_paths(clip=args.clip)
    results = {}
    for split in args.splits.split(","):
        results[split] = split_accuracy(metrics, split, args.n, args.resolution, args.seed)
        r = results[split]
        print(
            f"{split}: top-1 image -> caption {r['top1']:.1%} among {r['captions']} distinct captions "
            f"(chance {r['chance']:.1%}), {args.n} images",
            flush=True,
        )
    return results


if __name__ == "__main__":
    run_main(main)
