"""Data start-up and throughput: a generated folder of mixed-aspect JPEGs (+ captions).

Start-up: seconds from building the image-folder datamodule to its first training batch (what the data
adds before the first step; the model's part is the same in every case), each case in a fresh process:
  decode     every image opened and decoded at setup() (``data.check=decode``, the small-folder default)
  index      headers only, index built and cached (``data.check=header``, first run)
  cached     headers only, index read from the cache (every later run)
Throughput: images/s through the training loader (buckets, batch 32, one process, no workers) from the
folder and from WebDataset shards of the same images (``scripts/make_shards.py``).

    python benchmarks/data_loading.py                       # 20,000 images in /tmp/ldm_bench_folder
    python benchmarks/data_loading.py --images 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.task import run_main


def generate_folder(root: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs of about 256x256 pixels, aspect ratios 1:2 .. 2:1, each with a caption file."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        width, height = round(256 * ratio**0.5), round(256 / ratio**0.5)
        image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
        ImageDraw.Draw(image).ellipse(
            (width // 4, height // 4, 3 * width // 4, 3 * height // 4),
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
        sub = root / f"{k // 1000:03d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"{k:06d}.jpg", quality=90)
        (sub / f"{k:06d}.txt").write_text(f"image {k}, ellipse, {width}x{height}")


def _datamodule(kind: str, path: str, index_dir: str):
    if kind == "shards":
        from datamodules.shards import ShardsDataModule

        return ShardsDataModule(path, resolution=128, batch_size=32, val_size=4)
    from datamodules.image_folder import ImageFolderDataModule

    return ImageFolderDataModule(
        path,
        resolution=128,
        batch_size=32,
        val_size=4,
        num_workers=0,
        check="decode" if kind == "decode" else "header",
        index_dir=index_dir,
    )


def child(kind: str, path: str, index_dir: str, batches: int) -> None:
    """Runs in a fresh process: prints JSON with the start-up and loader timings (imports not counted)."""
    import datamodules.image_folder
    import datamodules.shards  # noqa: F401

    start = time.perf_counter()
    dm = _datamodule(kind, path, index_dir)
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    next(iterator)
    startup = time.perf_counter() - start
    images, t0 = 0, time.perf_counter()
    for _ in range(batches):
        images += len(next(iterator)["caption"])
    print(
        json.dumps(
            {"startup_s": startup, "images_per_s": images / (time.perf_counter() - t0) if batches else None}
        )
    )


def run_child(kind: str, path: Path, index_dir: Path, batches: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--path",
        str(path),
        "--index-dir",
        str(index_dir),
        "--batches",
        str(batches),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f}, {len(values)} runs)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--folder", default="/tmp/ldm_bench_folder")
    p.add_argument("--repeats", type=int, default=3, help="runs per start-up case")
    p.add_argument("--batches", type=int, default=60, help="batches of 32 timed for throughput")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--index-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.path, args.index_dir, args.batches)
        return
    folder = Path(args.folder)
    if len(list(folder.glob("*/*.jpg"))) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        generate_folder(folder, args.images)
        print(f"generated {args.images} images in {folder} ({time.perf_counter() - t0:.0f} s)")
    work = folder.parent / (folder.name + "_work")
    shutil.rmtree(work, ignore_errors=True)
    index_dir, shards = work / "index", work / "shards"

    results = {}
    for case in ("decode", "index", "cached"):
        times = []
        for _ in range(args.repeats):
            if case == "index":
                shutil.rmtree(index_dir, ignore_errors=True)
            times.append(
                run_child("header" if case != "decode" else "decode", folder, index_dir, 0)["startup_s"]
            )
        results[case] = times
        print(f"start-up to first batch, {case:7s}: {summary(times)} s")

    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_shards.py"),
            "--folder",
            str(folder),
            "--out",
            str(shards),
            "--resolution",
            "128",
            "--check",
            "header",
        ],
        check=True,
        capture_output=True,
    )
    print(f"make_shards: {time.perf_counter() - t0:.1f} s")
    for kind, path in (("folder", folder), ("shards", shards)):
        rates = [
            run_child("header" if kind == "folder" else "shards", path, index_dir, args.batches)[
                "images_per_s"
            ]
            for _ in range(args.repeats)
        ]
        print(f"loader throughput, {kind}: {summary(rates)} images/s")


if __name__ == "__main__":
    run_main(main)
