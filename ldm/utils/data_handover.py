"""What a model and its datamodule give each other, and nothing more: data flows one way.

The datamodule never sees the model object: what it needs of the model (an encoder for the latent cache, an
image generator for DreamBooth's class images, fingerprints that key both caches) comes as ``DataServices``.
The model never reads the datamodule: what it needs of the data (the resolution, the training captions the
text offload encodes) comes as ``DataFacts``; everything else it learns from batches.

``connect_data(model, datamodule)`` (called by ``train.py`` before ``trainer.fit``) wires the two: the model
gets a ``DataLink`` holding the datamodule's facts and its ``prepare_training_data``; the model calls it
once, in its ``setup`` after its weights are loaded (before a checkpoint's are restored, so class images come
from the base), with its services, and receives the facts the prepared data adds (the captions of the latent
cache).

This module is neutral ground: ``ldm/models`` and ``datamodules/`` both import it, neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable


class LatentEncoder(Protocol):
    def __call__(self, images: Any) -> tuple[Any, Any]:
        """Images [B, 3, H, W] in [-1, 1] -> the VAE posterior's (mean, std) latents."""


class ImageGenerator(Protocol):
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        sampler: str,
        steps: int,
        guidance_scale: float,
        resolution: int,
    ) -> Any:
        """Images [B, 3, R, R] in [-1, 1] for ``prompts``; image k's noise (initial and per step) from
        ``seeds[k]`` alone, whatever the batch."""


@dataclass(frozen=True)
class DataServices:
    """Model -> datamodule, once the model's weights are loaded.

    encode / vae_fingerprint(): the latent cache's encoder and a digest of every weight that shapes its
    output.
    generate / base_fingerprint(): DreamBooth's class-image generator and a digest of the weights it uses.
    device: where ``encode`` runs. The fingerprints are functions: computed (once) only when a cache needs
    them.
    """

    encode: LatentEncoder
    vae_fingerprint: Callable[[], str]
    generate: ImageGenerator | None = None
    base_fingerprint: Callable[[], str] | None = None
    device: Any = "cpu"


@dataclass(frozen=True)
class DataFacts:
    """Datamodule -> model. resolution: the training images' size (None: not fixed / unknown); captions:
    every training caption, when the data knows them up front (the latent cache)."""

    resolution: int | None = None
    captions: tuple[str, ...] | None = None

    def with_captions(self, captions: Sequence[str] | None) -> DataFacts:
        return replace(self, captions=None if captions is None else tuple(captions))


@dataclass(frozen=True)
class DataLink:
    """What ``connect_data`` gives a model: the data's facts and, when the data needs the model's services,
    the datamodule's ``prepare_training_data`` (services -> facts, e.g. with the cached captions)."""

    facts: DataFacts
    prepare: Callable[[DataServices], DataFacts] | None = None


@runtime_checkable
class DataProvider(Protocol):
    """A datamodule that states its facts (every datamodule of this project)."""

    def data_facts(self) -> DataFacts: ...


@runtime_checkable
class PreparesWithServices(DataProvider, Protocol):
    """A datamodule that needs the model's services before training (latent cache, class images)."""

    def prepare_training_data(self, services: DataServices) -> DataFacts: ...


@runtime_checkable
class DataConsumer(Protocol):
    """A model that takes a ``DataLink`` (LatentDiffusion and the fine-tunes)."""

    def link_data(self, link: DataLink) -> None: ...


def connect_data(model: Any, datamodule: Any) -> DataLink | None:
    """Give ``model`` its link to ``datamodule`` (see the module docstring); None when either side takes
    none. A model with ``uses_captions = False`` has a datamodule with ``skip_captions()`` read no caption."""
    if not getattr(model, "uses_captions", True) and hasattr(datamodule, "skip_captions"):
        datamodule.skip_captions()  # a model without text (a VAE): its data need not read any
    if not (isinstance(model, DataConsumer) and isinstance(datamodule, DataProvider)):
        return None
    prepare = datamodule.prepare_training_data if isinstance(datamodule, PreparesWithServices) else None
    link = DataLink(datamodule.data_facts(), prepare)
    model.link_data(link)
    return link
