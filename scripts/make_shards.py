"""Convert an image folder or the embedded shapes data into WebDataset shards (captions and bucket sizes
included) that ``data=shards data.path=<out>`` trains from.

    python scripts/make_shards.py --folder /data/photos --out /data/photos_shards --resolution 512
    python scripts/make_shards.py --shapes --train-size 20000 --val-size 256 --resolution 32 \
        --out data/shapes_shards

``--folder``: every image under it (recursively), its caption (caption file, metadata.jsonl, kohya
``<repeats>_<name>`` folder name, or ``--default-caption``) and kohya repeats; the image files are stored
as they are (no re-encoding). ``--shapes``: the embedded data's train (and ``--val-size`` val) split,
PNG-encoded (lossless: the shards give back exactly the in-memory images).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from datamodules.image_folder import scan_image_folder
from datamodules.shapes import ShapesDataModule
from datamodules.shards import write_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="an image folder (captions as data=image_folder reads them)")
    source.add_argument("--shapes", action="store_true", help="the embedded procedural shapes data")
    p.add_argument("--out", required=True, help="output folder (shards + index.json)")
    p.add_argument("--resolution", type=int, default=512, help="bucket area resolution^2 stored per sample")
    p.add_argument(
        "--bucket-step", type=int, default=None, help="bucket side multiple (default 64, or R/4 < 256)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (--folder)")
    p.add_argument("--default-caption", default="", help="caption of images without one (--folder)")
    p.add_argument(
        "--check",
        default="auto",
        choices=["auto", "decode", "header"],
        help="--folder: decode every image first, or read headers only",
    )
    p.add_argument("--train-size", type=int, default=20000, help="--shapes: training images")
    p.add_argument("--val-size", type=int, default=256, help="--shapes: validation images (0: none)")
    p.add_argument("--seed", type=int, default=0, help="--shapes: data seed")
    return p.parse_args(argv)


def folder_samples(root: str, caption_ext: str, default_caption: str, check: str):
    for record in scan_image_folder(root, caption_ext, check=check):
        caption = record.caption if record.caption is not None else record.class_name
        yield {
            "image": record.path.read_bytes(),
            "ext": record.path.suffix.lower().lstrip("."),
            "caption": default_caption if caption is None else caption,
            "width": record.size[0],
            "height": record.size[1],
            "repeats": record.repeats,
        }


def shapes_samples(dataset):
    for k in range(len(dataset)):
        item = dataset[k]
        pixels = ((item["image"] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        yield {
            "image": buffer.getvalue(),
            "ext": "png",
            "caption": item["caption"],
            "width": pixels.shape[1],
            "height": pixels.shape[0],
        }


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    common = {"shard_size": args.shard_size, "resolution": args.resolution, "bucket_step": args.bucket_step}
    if args.folder:
        index = write_shards(
            args.out,
            folder_samples(args.folder, args.caption_ext, args.default_caption, args.check),
            "train",
            **common,
        )
    else:
        data = ShapesDataModule(
            resolution=args.resolution,
            train_size=args.train_size,
            val_size=max(1, args.val_size),
            seed=args.seed,
        )
        data.setup()
        index = write_shards(args.out, shapes_samples(data.data_train), "train", **common)
        if args.val_size > 0:
            index = write_shards(args.out, shapes_samples(data.data_val), "val", **common)
    for split, columns in index["splits"].items():
        print(f"{split}: {len(columns['shard'])} samples in {len(columns['shards'])} shard(s)")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
