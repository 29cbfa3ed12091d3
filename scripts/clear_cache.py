"""Empty the latent cache (every fine-tuning run's encoded images), or every cache the project keeps.

    python scripts/clear_cache.py                      # .cache/latents under $LDM_ROOT (default: this folder)
    python scripts/clear_cache.py --dir /fast/latents  # another data.cache_dir
    python scripts/clear_cache.py --all                # also generated class images, folder indexes,
                                                       # converted datasets

Everything removed is rebuilt by the next run that needs it (latents encoded again, class images generated
again). Runs bound the latent cache themselves (``data.cache_max_gb``, least recently used first); this is for
the disk space now, or a cache you no longer trust.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.latent_cache import clear

# What --all removes under <root>/.cache: the folders conf/ points there (all rebuilt on demand).
OTHER_CACHES = ("class_images", "index", "hf_datasets")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dir",
        default=None,
        help="the latent cache folder (default: <root>/.cache/latents, where data.cache_dir points)",
    )
    p.add_argument(
        "--root",
        default=os.environ.get("LDM_ROOT", "."),
        help="the project root whose .cache/ to clear (paths.root_dir; default $LDM_ROOT or .)",
    )
    p.add_argument("--all", action="store_true", help=f"also .cache/{{{','.join(OTHER_CACHES)}}}")
    return p.parse_args(argv)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv=None) -> dict[str, int]:
    """-> bytes freed per cleared folder."""
    args = parse_args(argv)
    cache = Path(args.root).expanduser() / ".cache"
    latents = Path(args.dir).expanduser() if args.dir else cache / "latents"
    files, size = clear(latents)
    freed = {str(latents): size}
    print(f"{latents}: removed {files} latent cache file(s), {size / 1e6:.1f} MB")
    for name in OTHER_CACHES if args.all else ():
        folder = cache / name
        if folder.is_dir():
            freed[str(folder)] = _folder_size(folder)
            shutil.rmtree(folder)
            print(f"{folder}: removed, {freed[str(folder)] / 1e6:.1f} MB")
    return freed


if __name__ == "__main__":
    main()
