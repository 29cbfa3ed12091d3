"""Fine-tuning data: any captioned source datamodule + repeats, regularisation (class) images and latent
caching.

Every item carries ``is_regularization`` (False for the concept's own images, True for regularisation /
DreamBooth class images), so a method can weight the two (``FineTuneMethod.loss``). Condition dropout for
classifier-free guidance is the model's (``model.ucg_rate``), not the data's.

Latent caching encodes every training image with the (frozen) VAE once, before training, and keeps the
posterior mean and std (so each epoch still draws a fresh z = mean + std * eps). The cache also lives on
disk, keyed by the VAE encoder, the resolution, the flip variants and every image and caption, written
atomically and rebuilt when damaged (``datamodules/latent_cache.py``), so a second run skips the encoding.
``cache_check``: how images are recognised as unchanged ("stat": path, size and modification time; "hash":
their bytes); ``cache_max_gb``: the cache folder's size bound (least recently used entries go first).
Random augmentations would break a cache: a horizontal flip is cached as a second variant
(``flip_variants``); any other random transform in the source is refused.

Aspect-ratio buckets: when the items come in more than one size (a bucketed image folder), every batch -
for encoding, training and validation - comes from one size (``BucketBatchSampler``), and the cache holds
each image's latent at its bucket size (lists of tensors instead of one stacked tensor).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from datamodules.bucket_sampler import BucketBatchSampler, BucketLoader, trainer_position
from datamodules.latent_cache import cache_key, check_mode, evict, load_cache, mark_used, save_cache
from datamodules.masks import MaskWeighted
from datamodules.resumable import resumable_loader
from datamodules.samplers import set_dataset_epoch, training_sampler
from ldm.diffusion.losses import weight_on_latent_grid
from ldm.utils.data_handover import DataFacts, DataServices
from ldm.utils.logging import get_logger

log = get_logger(__name__)

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (mean, std)


class Repeated(Dataset):
    """``repeats`` x the source (each epoch sees every image ``repeats`` times). Repeat ``r`` of epoch ``e``
    shows the source in its epoch ``e * repeats + r``, so random augmentations differ between repeats."""

    def __init__(self, source: Dataset, repeats: int = 1):
        if int(repeats) < 1:
            raise ValueError(f"data.repeats must be >= 1, got {repeats}")
        self.source, self.repeats, self.epoch = source, int(repeats), 0

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        repeat, item = divmod(int(index), len(self.source))
        if self.repeats > 1:
            set_dataset_epoch(self.source, self.epoch * self.repeats + repeat)
        return self.source[item]


class CaptionsRewritten(Dataset):
    """The source's items passed through ``transform`` ((item, rng) -> item) each time one is drawn, e.g.
    textual inversion's placeholder prompts (``datamodules.placeholder_captions``). ``rng`` is a
    ``random.Random`` seeded by (epoch, index): random choices differ across epochs and items, yet are the
    same after a resume (the global RNG would not be: the loader prefetches ahead of the checkpoint)."""

    def __init__(self, source: Dataset, transform: Callable[[dict, random.Random], dict]):
        self.source, self.transform, self.epoch = source, transform, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.transform(dict(self.source[index]), random.Random(f"captions/{self.epoch}/{index}"))

    def set_epoch(self, epoch: int) -> None:  # called by the sampler (datamodules.samplers.set_dataset_epoch)
        self.epoch = int(epoch)


class Flagged(Dataset):
    """The source's items with ``is_regularization`` set to ``flag``."""

    def __init__(self, source: Dataset, flag: bool):
        self.source, self.flag = source, bool(flag)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], "is_regularization": self.flag}


def item_sizes(dataset: Dataset) -> list[tuple[int, int]]:
    """The (width, height) of every item (of its latent, for the latent cache), without loading images."""
    if isinstance(dataset, ConcatDataset):
        return [size for part in dataset.datasets for size in item_sizes(part)]
    if isinstance(dataset, Subset):
        inner = item_sizes(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, Repeated):
        return item_sizes(dataset.source) * dataset.repeats
    if isinstance(dataset, (Flagged, CaptionsRewritten, MaskWeighted)):
        return item_sizes(dataset.source)
    if isinstance(dataset, LatentCacheDataset):
        return [(m.shape[-1], m.shape[-2]) for m in dataset.means[0]] * dataset.repeats
    if hasattr(dataset, "target_size"):
        return [tuple(dataset.target_size(i)) for i in range(len(dataset))]
    side = getattr(dataset, "resolution", 0)
    return [(side, side)] * len(dataset)


def bucket_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    position: dict | None = None,
) -> DataLoader:
    """Batches of one item size each when the sizes differ (aspect-ratio buckets), plain batches otherwise.
    ``position``: a saved ``BucketBatchSampler.position_state`` to resume from (bucketed batches only)."""
    sizes = item_sizes(dataset)
    keys = sorted(set(sizes))
    if len(keys) <= 1:  # one size: the seeded training order dealt to ranks (datamodules.samplers)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=training_sampler(dataset) if shuffle else None,
            num_workers=num_workers,
            drop_last=drop_last,
        )
    ids = [keys.index(size) for size in sizes]
    # per-epoch flip variants, augmentations
    sampler = BucketBatchSampler(
        ids, batch_size, shuffle=shuffle, position=position, dataset=dataset if shuffle else None
    )
    return (BucketLoader if shuffle else DataLoader)(dataset, batch_sampler=sampler, num_workers=num_workers)


SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class LatentCacheDataset(Dataset):
    """Items {"latent_mean", "latent_std", "caption", "is_regularization"} from tensors encoded once, plus
    SDXL's size conditions when the source items carried them (``sizes``: batch key -> [N, 2], the crop each
    image's latent was encoded from; a flipped variant keeps its centre crop's offset).

    ``means`` / ``stds``: [variant, N, C, h, w] tensors, or (bucketed data) per variant a list of N
    [C, h, w] tensors of each item's bucket size.

    With ``flip_variants`` each visit picks the plain or the flipped latent from (epoch, position): random
    across epochs and repeats, yet the same after a resume (no global RNG; the sampler calls ``set_epoch``).
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        captions: list[str],
        flip_variants: bool,
        flags: torch.Tensor | None = None,
        repeats: int = 1,
        sizes: dict[str, torch.Tensor] | None = None,
        weights: list | None = None,
    ):
        self.means, self.stds, self.captions, self.flip_variants = means, stds, captions, flip_variants
        self.sizes = dict(sizes or {})
        self.weights = weights  # masked loss: per variant, each item's loss weight [1, h, w] (latent grid)
        self.flags = flags if flags is not None else torch.zeros(len(captions), dtype=torch.bool)
        self.repeats, self.epoch = int(repeats), 0

    def __len__(self) -> int:
        return len(self.captions) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def with_repeats(self, repeats: int) -> LatentCacheDataset:
        return LatentCacheDataset(
            self.means,
            self.stds,
            self.captions,
            self.flip_variants,
            self.flags,
            repeats,
            self.sizes,
            self.weights,
        )

    def __getitem__(self, index: int) -> dict:
        item = index % len(self.captions)
        variant = random.Random(f"{self.epoch}/{index}").getrandbits(1) if self.flip_variants else 0
        out = {
            "latent_mean": self.means[variant][item],
            "latent_std": self.stds[variant][item],
            "caption": self.captions[item],
            "is_regularization": bool(self.flags[item]),
            **{key: values[item] for key, values in self.sizes.items()},
        }
        if self.weights is not None:
            out["loss_weight"] = self.weights[variant][item]
        return out


def _refuse_random_augmentations(dataset: Dataset) -> None:
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _refuse_random_augmentations(part)
        return
    while isinstance(dataset, (Subset, Flagged)):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.source
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
def encode_dataset(
    dataset: Dataset,
    encode: EncodeFn,
    flip_variants: bool,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> LatentCacheDataset:
    from rich.progress import track

    loader = bucket_loader(dataset, batch_size, shuffle=False)
    order = [i for batch in loader.batch_sampler for i in batch]  # dataset indices in loader order
    means, stds, captions, flags, weights = [[], []], [[], []], [], [], [[], []]
    sizes: dict[str, list[torch.Tensor]] = {}
    for batch in track(loader, description="caching latents", disable=len(loader) < 2):
        images = batch["image"].to(device)
        for variant, imgs in enumerate([images, images.flip(-1)] if flip_variants else [images]):
            mean, std = encode(imgs)
            means[variant] += list(mean.cpu())
            stds[variant] += list(std.cpu())
            if "loss_weight" in batch:  # masked loss: the weights on the latent grid, flipped with the image
                weight = batch["loss_weight"].flip(-1) if variant else batch["loss_weight"]
                weights[variant] += list(weight_on_latent_grid(weight, mean).cpu())
        captions += list(batch["caption"])
        flags.append(torch.as_tensor(batch.get("is_regularization", [False] * len(images)), dtype=torch.bool))
        for key in SIZE_KEYS if all(k in batch for k in SIZE_KEYS) else ():
            sizes.setdefault(key, []).append(torch.as_tensor(batch[key], dtype=torch.long))
    variants = 2 if flip_variants else 1
    position = {index: k for k, index in enumerate(order)}
    ranked = [position[i] for i in range(len(order))]  # back to dataset order
    flags = torch.cat(flags)[ranked]
    means = [[means[v][k] for k in ranked] for v in range(variants)]
    stds = [[stds[v][k] for k in ranked] for v in range(variants)]
    captions = [captions[k] for k in ranked]
    sizes = {key: torch.cat(parts)[ranked] for key, parts in sizes.items()}
    weights = [[weights[v][k] for k in ranked] for v in range(variants)] if weights[0] else None
    if len({m.shape for m in means[0]}) == 1:  # one size: stacked tensors, as before
        means, stds = (
            torch.stack([torch.stack(m) for m in means]),
            torch.stack([torch.stack(s) for s in stds]),
        )
    return LatentCacheDataset(means, stds, captions, flip_variants, flags, sizes=sizes, weights=weights)


class FineTuneDataModule(L.LightningDataModule):
    """Wraps ``source`` (e.g. the shapes "concept" split or an image folder) for fine-tuning.

    validation: what ``val/loss`` is measured on --
        "source": the source's own validation split (when it has real held-out images, like the shapes data);
        "regularization": held-out regularisation images (measures drift on what the base knew);
        "auto": "regularization" when regularisation data is given, else "none";
        "none": no validation loss (a few-image concept keeps every image for training; the image logger
        still shows the log prompts).
    caption_transform: (item, rng) -> item applied whenever a training or validation item is drawn (after the
        latent cache), e.g. ``datamodules.placeholder_captions.PlaceholderCaptions`` for textual inversion.
    """

    VALIDATION = ("auto", "source", "regularization", "none")

    def __init__(
        self,
        source: L.LightningDataModule,
        resolution: int | None = None,
        batch_size: int = 8,
        repeats: int = 1,
        cache_latents: bool = True,
        flip_variants: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 0,
        regularization: L.LightningDataModule | None = None,
        regularization_size: int = 0,
        validation: str = "auto",
        caption_transform: Callable[[dict, random.Random], dict] | None = None,
        cache_check: str = "stat",
        cache_max_gb: float | None = 20.0,
        masked_loss: bool = False,
        unmasked_weight: float = 0.0,
    ):
        super().__init__()
        if validation not in self.VALIDATION:
            raise ValueError(f"data.validation must be one of {self.VALIDATION}, got {validation!r}")
        check_mode(cache_check)
        if cache_max_gb is not None and not float(cache_max_gb) >= 0:
            raise ValueError(f"data.cache_max_gb must be >= 0 or null (no bound), got {cache_max_gb}")
        self.save_hyperparameters(ignore=["source", "regularization", "caption_transform"], logger=False)
        self.source = source
        self.regularization = regularization
        self.caption_transform = caption_transform
        self.resolution = (
            resolution or getattr(source, "resolution", None) or source.hparams.get("resolution")
        )
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.cached: LatentCacheDataset | None = None
        self._position: dict | None = None  # where a resumed bucketed run continues (from a checkpoint)

    def _validation_kind(self) -> str:
        kind = self.hparams.validation
        if kind == "auto":
            kind = "regularization" if self._uses_regularization() else "none"
        if kind == "regularization" and not self._uses_regularization():
            raise ValueError(
                "data.validation=regularization needs data.regularization and data.regularization_size > 0"
            )
        return kind

    def _uses_regularization(self) -> bool:
        return self.regularization is not None and self.hparams.regularization_size > 0

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        self.source.setup(stage)
        self.data_train = Flagged(self.source.data_train, False)
        parts = [f"{len(self.data_train)} image(s) x {self.hparams.repeats} repeat(s)"]
        if self._uses_regularization():
            # regularisation images (kohya's "reg images", DreamBooth's class images): what the model already
            # knows, mixed in so that the fine-tune does not drift on other prompts
            self.regularization.setup(stage)
            reg = self.regularization.data_train
            size = min(self.hparams.regularization_size, len(reg))
            self.data_train = ConcatDataset([self.data_train, Flagged(Subset(reg, range(size)), True)])
            parts.append(f"{size} regularisation image(s)")
        kind = self._validation_kind()
        self.data_val = {
            "source": lambda: Flagged(self.source.data_val, False),
            "regularization": lambda: Flagged(self.regularization.data_val, True),
            "none": lambda: None,
        }[kind]()
        if kind == "source" and hasattr(self.source, "records"):
            log.warning(
                "data.validation=source: validating on images held out of your folder (they do not train)"
            )
        parts.append(f"validation: {kind}" + (f" ({len(self.data_val)} images)" if self.data_val else ""))
        log.info("Fine-tuning data: " + ", ".join(parts))
        self._declare_validation()
        if self.hparams.cache_latents:
            _refuse_random_augmentations(self.data_train)
        self.data_train = self.masked(self.data_train)

    def masked(self, data: Dataset) -> Dataset:
        """With ``masked_loss``: items carry ``loss_weight`` from their masks (``datamodules/masks.py``)."""
        if not self.hparams.get("masked_loss", False):
            return data
        return MaskWeighted(data, self.hparams.get("unmasked_weight", 0.0))

    # -- the model's side: services in, facts out (ldm/utils/data_handover.py) ----------------------------
    def data_facts(self) -> DataFacts:
        """The resolution, and every training caption once the latents are cached (the text offload's)."""
        return DataFacts(self.resolution, tuple(self.cached.captions) if self.cached is not None else None)

    def prepare_training_data(self, services: DataServices) -> DataFacts:
        """Called (through the model's ``DataLink``) once the model's weights are loaded, before the
        dataloaders: the latent cache. Under DDP with a disk cache rank zero encodes and writes it while the
        others wait, then they read it (without a disk cache every rank encodes in memory)."""
        trainer = self.trainer
        shared = trainer is not None and trainer.world_size > 1 and bool(self.hparams.cache_dir)

        def cache() -> None:
            self.cache_latents(services.encode, services.vae_fingerprint, device=services.device)

        if shared and trainer.global_rank == 0:
            cache()
        if shared:
            trainer.strategy.barrier("latent-cache")
        if not shared or trainer.global_rank != 0:
            cache()
        return self.data_facts()

    def cache_latents(
        self, encode: EncodeFn, vae_fingerprint: str | Callable[[], str], device: torch.device | str = "cpu"
    ) -> None:
        """Encode the training images once with ``encode`` (or load them from the disk cache).
        ``vae_fingerprint`` (or a function giving it) must identify the VAE encoder's weights
        (see ``datamodules/latent_cache.py``)."""
        if not self.hparams.cache_latents or self.cached is not None:
            return
        path = None
        if self.hparams.cache_dir:
            sizes = str(item_sizes(self.data_train))  # every item's bucket
            fingerprint = vae_fingerprint() if callable(vae_fingerprint) else vae_fingerprint
            key = cache_key(
                self.data_train,
                fingerprint,
                self.resolution,
                self.hparams.flip_variants,
                sizes,
                check=self.hparams.cache_check,
            )
            path = Path(self.hparams.cache_dir) / f"latents_{key}.pt"
            found = path.is_file()
            state = load_cache(path, len(self.data_train), self.hparams.flip_variants) if found else None
            if state is not None:
                self.cached = LatentCacheDataset(
                    state["means"],
                    state["stds"],
                    state["captions"],
                    state["flip_variants"],
                    state["flags"],
                    sizes=state.get("sizes"),
                    weights=state.get("weights"),
                )
                log.info(f"Loaded {len(self.cached)} cached latents from {path}")
                mark_used(path)
                evict(path.parent, self.hparams.cache_max_gb, keep=path)
                return
        self.cached = encode_dataset(self.data_train, encode, self.hparams.flip_variants, device=device)
        if path is not None:
            cached = self.cached
            save_cache(
                path,
                {
                    "means": cached.means,
                    "stds": cached.stds,
                    "captions": cached.captions,
                    "flip_variants": cached.flip_variants,
                    "flags": cached.flags,
                    "sizes": cached.sizes,
                    **({"weights": cached.weights} if cached.weights is not None else {}),
                },
            )
            log.info(f"Cached {len(self.cached)} latents to {path}")
            evict(path.parent, self.hparams.cache_max_gb, keep=path)

    def _rewritten(self, data: Dataset) -> Dataset:
        return data if self.caption_transform is None else CaptionsRewritten(data, self.caption_transform)

    def train_dataloader(self) -> DataLoader:
        repeats = self.hparams.repeats
        cached = self.cached
        if self.hparams.cache_latents and cached is None:
            log.warning(
                "data.cache_latents=true but no latents were cached (the model's services were never "
                "handed over: ldm.utils.data_handover.connect_data); training on images"
            )
        view = cached.with_repeats(repeats) if cached is not None else Repeated(self.data_train, repeats)
        view = self._rewritten(view)
        batch_size, drop_last = self.hparams.batch_size, len(view) > self.hparams.batch_size
        if len(set(item_sizes(view))) <= 1:  # one size: the exactly resumable loader
            return resumable_loader(
                view, batch_size, num_workers=self.hparams.num_workers, drop_last=drop_last
            )
        position, self._position = self._position, None  # buckets: resumed via this datamodule's state
        return bucket_loader(
            view, batch_size, shuffle=True, num_workers=self.hparams.num_workers, position=position
        )

    def state_dict(self) -> dict:
        """Bucketed training only (``bucket_sampler.trainer_position``; the uniform-size loader keeps its own
        position, ``datamodules/resumable.py``)."""
        return trainer_position(getattr(self, "trainer", None))

    def load_state_dict(self, state_dict: dict) -> None:
        self._position = state_dict.get("bucket_position")

    def _declare_validation(self) -> None:
        """Without validation data this datamodule has no ``val_dataloader`` (an instance attribute ``None``
        hides the method), so Lightning runs no validation loop - instead of an empty loader it warns
        about."""
        if self.data_val is None:
            self.val_dataloader = None
        else:
            self.__dict__.pop("val_dataloader", None)

    def val_dataloader(self) -> DataLoader:
        return bucket_loader(
            self._rewritten(self.data_val),
            self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )
