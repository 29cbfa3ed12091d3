"""Fine-tuning data: any captioned source datamodule + repeats, caption dropout and latent caching.

Latent caching encodes every training image with the (frozen) VAE once, before training, and keeps the
posterior mean and std (so each epoch still draws a fresh z = mean + std * eps). The cache also lives on
disk, keyed by the VAE weights, the resolution and the data, so a second run skips the encoding.
Random augmentations would break a cache: a horizontal flip is cached as a second variant
(``flip_variants``); any other random transform in the source is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ldm.utils.logging import get_logger

log = get_logger(__name__)

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (mean, std)


class CaptionedView(Dataset):
    """``repeats`` x the source, with caption dropout (caption -> "" with probability p)."""

    def __init__(self, source: Dataset, repeats: int = 1, caption_dropout: float = 0.0):
        self.source, self.repeats, self.caption_dropout = source, int(repeats), float(caption_dropout)

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def __getitem__(self, index: int) -> dict:
        item = dict(self.source[index % len(self.source)])
        if self.caption_dropout > 0 and torch.rand(()) < self.caption_dropout:
            item["caption"] = ""
        return item


class LatentCacheDataset(Dataset):
    """Items {"latent_mean", "latent_std", "caption"} from tensors encoded once."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, captions: list[str], flip_variants: bool):
        self.means, self.stds, self.captions, self.flip_variants = means, stds, captions, flip_variants

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        variant = int(torch.randint(0, 2, ())) if self.flip_variants else 0
        return {"latent_mean": self.means[variant, index], "latent_std": self.stds[variant, index],
                "caption": self.captions[index]}


def _refuse_random_augmentations(dataset: Dataset) -> None:
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _refuse_random_augmentations(part)
        return
    dataset = dataset.dataset if isinstance(dataset, Subset) else dataset
    flip = getattr(dataset, "random_flip", 0.0) or 0.0
    center = getattr(dataset, "center_crop", True)
    if flip > 0 or not center:
        raise ValueError(
            "latent caching needs deterministic source images, but the source dataset uses "
            f"random_flip={flip}, center_crop={center}. Set data.source.random_flip=0 and "
            "data.source.center_crop=true (and data.flip_variants=true to cache flipped copies too), "
            "or data.cache_latents=false."
        )


@torch.no_grad()
def encode_dataset(dataset: Dataset, encode: EncodeFn, flip_variants: bool, batch_size: int = 32,
                   device: torch.device | str = "cpu") -> LatentCacheDataset:
    from rich.progress import track

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    means, stds, captions = [[], []], [[], []], []
    for batch in track(loader, description="caching latents", disable=len(loader) < 2):
        images = batch["image"].to(device)
        for variant, imgs in enumerate([images, images.flip(-1)] if flip_variants else [images]):
            mean, std = encode(imgs)
            means[variant].append(mean.cpu())
            stds[variant].append(std.cpu())
        captions += list(batch["caption"])
    variants = 2 if flip_variants else 1
    return LatentCacheDataset(torch.stack([torch.cat(means[v]) for v in range(variants)]),
                              torch.stack([torch.cat(stds[v]) for v in range(variants)]), captions, flip_variants)


class FineTuneDataModule(L.LightningDataModule):
    """Wraps ``source`` (e.g. the shapes "concept" split or an image folder) for fine-tuning."""

    def __init__(self, source: L.LightningDataModule, resolution: int | None = None, batch_size: int = 8,
                 repeats: int = 1, caption_dropout: float = 0.0, cache_latents: bool = True,
                 flip_variants: bool = False, cache_dir: str | None = None, num_workers: int = 0,
                 regularization: L.LightningDataModule | None = None, regularization_size: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["source", "regularization"], logger=False)
        self.source = source
        self.regularization = regularization
        self.resolution = resolution or getattr(source, "resolution", None) or source.hparams.get("resolution")
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.cached: LatentCacheDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.source.setup(stage)
        self.data_train = self.source.data_train
        self.data_val = self.source.data_val
        if self.regularization is not None and self.hparams.regularization_size > 0:
            # regularisation images (kohya's "reg images"): captioned images of what the model already
            # knows, mixed in so that the fine-tune does not drift on other prompts
            self.regularization.setup(stage)
            reg = self.regularization.data_train
            size = min(self.hparams.regularization_size, len(reg))
            self.data_train = ConcatDataset([self.data_train, Subset(reg, range(size))])
        if self.hparams.cache_latents:
            _refuse_random_augmentations(self.data_train)

    def _fingerprint(self, vae_fingerprint: str) -> str:
        data = self.data_train
        first = data[0]["image"] if len(data) else torch.zeros(1)
        parts = [vae_fingerprint, str(self.resolution), str(len(data)), type(data).__name__,
                 str(getattr(data, "seed", "")), str(getattr(data, "split", "")),
                 hashlib.sha1(first.numpy().tobytes()).hexdigest(), str(self.hparams.flip_variants)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]

    def cache_latents(self, encode: EncodeFn, vae_fingerprint: str, device: torch.device | str = "cpu") -> None:
        """Called by the fine-tuning model once its VAE is loaded (before the dataloaders are built)."""
        if not self.hparams.cache_latents or self.cached is not None:
            return
        path = None
        if self.hparams.cache_dir:
            path = Path(self.hparams.cache_dir) / f"latents_{self._fingerprint(vae_fingerprint)}.pt"
            if path.is_file():
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.cached = LatentCacheDataset(state["means"], state["stds"], state["captions"],
                                                 state["flip_variants"])
                log.info(f"Loaded {len(self.cached)} cached latents from {path}")
                return
        self.cached = encode_dataset(self.data_train, encode, self.hparams.flip_variants, device=device)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"means": self.cached.means, "stds": self.cached.stds, "captions": self.cached.captions,
                        "flip_variants": self.cached.flip_variants}, path)
            log.info(f"Cached {len(self.cached)} latents to {path}")

    def train_dataloader(self) -> DataLoader:
        data = self.cached if self.cached is not None else self.data_train
        view = CaptionedView(data, self.hparams.repeats, self.hparams.caption_dropout)
        return DataLoader(view, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers, drop_last=len(view) > self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data_val, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
