"""Trainer-style captions: kohya ``<repeats>_<name>`` folders and tag-list caption augmentation.

kohya sd-scripts' DreamBooth layout: the images of ``train/10_sks dog/`` are repeated 10 times per
epoch, and ``sks dog`` is their caption when an image has no caption file (it is also the class of
the concept). Tag-list captions ("1girl, red hair, smiling, outdoors") are shuffled each time an
image is drawn, except the first ``keep_tags`` tags (the trigger word usually comes first), and each
other tag may be dropped with probability ``tag_dropout`` (kohya's ``shuffle_caption``,
``keep_tokens`` and ``caption_tag_dropout_rate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TagAugment", "kohya_subset"]

_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


def kohya_subset(root: Path, path: Path) -> tuple[int, str] | None:
    """(repeats, name) when ``path`` lies under a ``<repeats>_<name>`` folder directly in ``root``."""
    try:
        first = path.relative_to(root).parts[0]
    except (ValueError, IndexError):
        return None
    if first == path.name:  # a file in root itself
        return None
    match = _KOHYA_DIR.match(first)
    if match is None:
        return None
    repeats = int(match.group(1))
    if repeats < 1:
        raise ValueError(
            f"folder {str(root / first)!r} asks for {repeats} repeats; kohya folders are "
            f"'<repeats>_<name>' with repeats >= 1 (e.g. '10_sks dog')"
        )
    return repeats, match.group(2).strip()


@dataclass
class TagAugment:
    """Shuffle / drop the tags of a separator-joined caption (training only).

    Args:
        shuffle: shuffle the tags after the first ``keep_tags``.
        keep_tags: how many leading tags stay in place (and are never dropped).
        tag_dropout: probability of dropping each other tag.
        separator: what joins the tags (kohya: ",").
    """

    shuffle: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    separator: str = ","

    def __post_init__(self):
        if not 0.0 <= float(self.tag_dropout) <= 1.0:
            raise ValueError(f"tag_dropout must be a probability in [0, 1], got {self.tag_dropout}")
        if int(self.keep_tags) < 0:
            raise ValueError(f"keep_tags must be >= 0, got {self.keep_tags}")

    @property
    def active(self) -> bool:
        return self.shuffle or self.tag_dropout > 0

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        if not self.active or self.separator not in caption:
            return caption
        tags = [t.strip() for t in caption.split(self.separator) if t.strip()]
        kept, rest = tags[: self.keep_tags], tags[self.keep_tags :]
        if self.tag_dropout > 0 and rest:
            keep = torch.rand(len(rest), generator=generator) >= self.tag_dropout
            rest = [t for t, k in zip(rest, keep.tolist()) if k]
        if self.shuffle and len(rest) > 1:
            rest = [rest[k] for k in torch.randperm(len(rest), generator=generator).tolist()]
        joiner = self.separator + " " if self.separator.strip() else self.separator
        return joiner.join(kept + rest)
