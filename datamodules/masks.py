"""Masks for the masked loss (kohya's ``--masked_loss``, OneTrainer's masked training): per training image, a
mask of the subject weights the diffusion loss per latent pixel, so the backgrounds of a few training images
are not learnt with the subject.

Where masks come from: an image folder's ``cat.png`` + ``cat.mask.png`` (any image extension; white = the
subject, grey levels weigh in between), else the image's own alpha channel; the embedded DreamBooth subjects
know theirs (``datamodules.dreambooth.SubjectDataset``). A dataset that can give masks has
``enable_masks()`` and then puts ``mask`` (float ``[1, H, W]`` in [0, 1], after the image's bucket resize,
crop and flip) into its items.

:class:`MaskWeighted` turns them into ``loss_weight`` = ``mask + unmasked_weight x (1 - mask)``;
regularisation (class) items, which have no mask, weigh 1 everywhere. The latent cache keeps the weights
on the latent grid beside each latent (``datamodules.finetune.encode_dataset``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from datamodules.transforms import IMAGE_EXTENSIONS

MASK_SUFFIX = ".mask"


def is_mask_file(name: str | Path) -> bool:
    """``cat.mask.png`` is the mask of ``cat.png``, not a training image."""
    return Path(Path(name).stem).suffix.lower() == MASK_SUFFIX


def mask_file_for(image: Path) -> Path | None:
    """``<folder>/<stem>.mask.<ext>`` beside ``image``, if there is one."""
    for ext in IMAGE_EXTENSIONS:
        for spelling in (ext, ext.upper()):
            candidate = image.with_name(f"{image.stem}{MASK_SUFFIX}{spelling}")
            if candidate.is_file():
                return candidate
    return None


def open_mask(image: Path) -> tuple[Image.Image, str]:
    """(the mask of ``image`` as an "L" image, where it came from): its ``.mask`` file, else its alpha
    channel; checked: same size as the image and not empty. Errors name the file and the fix."""
    mask_path = mask_file_for(image)
    with Image.open(image) as opened:
        size = opened.size
        has_alpha = opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info
        alpha = opened.convert("RGBA").getchannel("A") if mask_path is None and has_alpha else None
    if mask_path is not None:
        with Image.open(mask_path) as opened:
            mask = opened.convert("L")
        where = str(mask_path)
    elif alpha is not None:
        mask, where = alpha, f"{image} (alpha channel)"
    else:
        raise ValueError(
            f"data.masked_loss=true: no mask for {image}: add {image.stem}{MASK_SUFFIX}.png beside it "
            "(white = the subject) or save the image with an alpha channel, or set data.masked_loss=false"
        )
    if mask.size != size:
        raise ValueError(
            f"mask {where} is {mask.size[0]}x{mask.size[1]} but its image {image} is {size[0]}x{size[1]}: "
            "a mask must have its image's size"
        )
    if not np.asarray(mask).any():
        raise ValueError(
            f"mask {where} is empty (all black): the loss would ignore the whole image; paint the subject "
            "white, or remove the mask file"
        )
    return mask, where


def mask_tensor(rgb_tensor: torch.Tensor) -> torch.Tensor:
    """A mask run through the image transforms as RGB ``[3, H, W]`` in [-1, 1] -> ``[1, H, W]`` in [0, 1]."""
    return ((rgb_tensor[:1] + 1.0) / 2.0).clamp_(0.0, 1.0)


def enable_masks(dataset: Dataset) -> int:
    """Ask every dataset inside ``dataset`` (through ConcatDataset, Subset and ``.source`` wrappers) that
    can give masks to do so; returns how many can. Regularisation sets need none."""
    if isinstance(dataset, ConcatDataset):
        return sum(enable_masks(part) for part in dataset.datasets)
    if isinstance(dataset, Subset):
        return enable_masks(dataset.dataset)
    if getattr(dataset, "is_regularization", False) is True or getattr(dataset, "flag", False) is True:
        return 0  # class / regularisation images (dreambooth.Tagged, finetune.Flagged) weigh 1 everywhere
    if hasattr(dataset, "enable_masks"):
        dataset.enable_masks()
        return 1
    source = getattr(dataset, "source", None)
    return enable_masks(source) if isinstance(source, Dataset) else 0


class MaskWeighted(Dataset):
    """Items of ``source`` with ``loss_weight`` ``[1, H, W]``: ``mask + unmasked_weight x (1 - mask)`` (the
    item's ``mask``), or ones for a regularisation item; a training item without a mask is an error."""

    def __init__(self, source: Dataset, unmasked_weight: float = 0.0):
        if not 0.0 <= float(unmasked_weight) <= 1.0:
            raise ValueError(f"data.unmasked_weight must be in [0, 1], got {unmasked_weight}")
        if not enable_masks(source):
            raise ValueError(
                "data.masked_loss=true, but the training data gives no masks: use an image folder (cat.png + "
                "cat.mask.png, or images with an alpha channel) or the embedded DreamBooth subjects"
            )
        self.source, self.unmasked_weight = source, float(unmasked_weight)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.source[index])
        mask = item.pop("mask", None)
        if mask is None:
            if not item.get("is_regularization", False):
                raise ValueError(f"data.masked_loss=true: training item {index} has no mask")
            mask = torch.ones(1, *item["image"].shape[-2:])
        item["loss_weight"] = mask + self.unmasked_weight * (1.0 - mask)
        return item

    def fingerprint(self, check: str = "stat") -> str:
        """For the latent cache key: the source's, the weight outside masks and every item's weights."""
        from datamodules.latent_cache import dataset_fingerprint

        digest = hashlib.sha1(
            f"{dataset_fingerprint(self.source, check=check)}|{self.unmasked_weight}".encode()
        )
        for index in range(len(self)):
            digest.update(self[index]["loss_weight"].numpy().tobytes())
        return digest.hexdigest()
