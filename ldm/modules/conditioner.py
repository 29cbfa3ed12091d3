"""The conditioner: every condition of a diffusion model, from the batch, as one dict (the shape of sgm's
``GeneralConditioner``).

A ``Conditioner`` holds a list of embedders (plain ``nn.Module``s). Each embedder

* reads one key of the batch, its ``input_key`` (``"caption"``: a list of strings; later size / crop numbers);
* has its own condition-dropout rate, ``ucg_rate`` (``None``: the model's ``ucg_rate``), applied while
  training: a dropped caption becomes ``""`` (what Stable Diffusion trained with), a dropped non-text value
  gives a zero embedding;
* trains or not: ``is_trainable(embedder)`` is True when any of its parameters requires grad (text encoders
are
  frozen unless a fine-tuning method unfreezes them or adds parameters to them);
* returns a tensor ``[B, T, D]`` (cross-attention context), ``[B, V]`` (a vector: pooled text, size features)
or
  a dict ``{"crossattn": ..., "vector": ...}`` with both.

``Conditioner(batch)`` concatenates the embedders' contexts along features (``"crossattn"``: ``[B, T, sum
D]``) and their vectors along features (``"vector"``: ``[B, sum V]``, present when any embedder gives one).
SD 1.x is one CLIP embedder, SD 2.x one OpenCLIP embedder; SDXL two text embedders (penultimate layer, the
second also pooled: ``PooledCLIPTextEncoder``) and three size embedders (``SizeEmbedding``, one per batch key
``original_size_as_tuple`` / ``crop_coords_top_left`` / ``target_size_as_tuple``), so its vector is
pooled (1280) + 3 x 512 = 2816 = the UNet's ``adm_in_channels``. Condition dropout follows sgm: each embedder
draws by its own rate (the two text embedders independently; a dropped caption is "" for that embedder, its
pooled vector included, as diffusers' SDXL script's empty prompts give); SDXL sets the sizes' ``ucg_rate`` to
0.

Text embedders (``CLIPTextEncoder``) are encoded through their prompt cache (``encode_cached``) unless the
caller asks otherwise (a fine-tune that trains the text encoder). Parameter names: ``embedders.<i>.<the
embedder's>``, so a checkpoint's keys read ``conditioner.embedders.0.transformer.text_model...`` (sgm's
layout).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["OUTPUT_KEYS", "TEXT_KEY", "Conditioner", "as_conditioner", "embedder", "is_trainable"]

TEXT_KEY = "caption"
OUTPUT_KEYS = {3: "crossattn", 2: "vector"}  # an embedder's bare tensor output, by number of dimensions


def embedder(module: nn.Module, input_key: str = TEXT_KEY, ucg_rate: float | None = None) -> nn.Module:
    """``module`` with its embedder options set (a Hydra target: ``conf/model/conditioner/*.yaml``)."""
    module.input_key = str(input_key)
    module.ucg_rate = None if ucg_rate is None else float(ucg_rate)
    return module


def input_key(module: nn.Module) -> str:
    return getattr(module, "input_key", TEXT_KEY)


def is_trainable(module: nn.Module) -> bool:
    """Whether the embedder trains: any parameter requires grad."""
    return any(p.requires_grad for p in module.parameters())


def _is_text(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values)


class Conditioner(nn.Module):
    """Embedders -> ``{"crossattn": [B, T, D], "vector": [B, V]}``; see the module docstring.

    Args:
        embedders: the embedders in order (a sequence, or a mapping whose keys give the order: Hydra composes
            ``embedders: {"0": ..., "1": ...}``).
        force_zeros_for_empty_prompt: SDXL's sampling rule: an empty negative prompt gives zero context and
            zero pooled vector from the text embedders (``forward(..., zero_empty=True)``; the sizes stay).
    """

    def __init__(
        self,
        embedders: Sequence[nn.Module] | Mapping[str, nn.Module],
        force_zeros_for_empty_prompt: bool = False,
    ):
        super().__init__()
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        if isinstance(embedders, Mapping):
            keys = sorted(
                embedders, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, k)
            )
            embedders = [embedders[k] for k in keys]
        if not embedders:
            raise ValueError(
                "a Conditioner needs at least one embedder (model.conditioner.embedders is empty)"
            )
        self.embedders = nn.ModuleList(embedders)

    # -- what it holds ---------------------------------------------------------------------------------
    @property
    def text_embedders(self) -> list[nn.Module]:
        """The embedders that read the caption, in order."""
        return [e for e in self.embedders if input_key(e) == TEXT_KEY]

    @property
    def text_encoder(self) -> nn.Module:
        """The one text embedder (SD 1.x / 2.x); an error when there are several (SDXL: index
        ``embedders``)."""
        text = self.text_embedders
        if len(text) != 1:
            raise ValueError(
                f"this conditioner has {len(text)} text embedders, not one: use conditioner.text_embedders[i]"
            )
        return text[0]

    @property
    def input_keys(self) -> list[str]:
        """The batch keys the embedders read, in order, without repeats."""
        return list(dict.fromkeys(input_key(e) for e in self.embedders))

    @property
    def context_dim(self) -> int | None:
        """Width of the concatenated cross-attention context (the embedders' ``hidden_size``), if known."""
        widths = [getattr(e, "hidden_size", None) for e in self.text_embedders]
        return sum(widths) if widths and None not in widths else None

    @staticmethod
    def ucg_rate_of(module: nn.Module, default: float) -> float:
        rate = getattr(module, "ucg_rate", None)
        return float(default if rate is None else rate)

    # -- conditions ------------------------------------------------------------------------------------
    def forward(
        self,
        batch: Mapping[str, Any],
        device: torch.device | str | None = None,
        ucg_rate: float = 0.0,
        draw: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
        use_cache: bool = True,
        zero_empty: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The conditions of ``batch``. With ``draw`` (uniform [0, 1) draws of a shape; training), each
        embedder drops its condition with its ``ucg_rate`` (default ``ucg_rate``), one draw per embedder that
        drops. ``use_cache``: encode text through the embedders' prompt caches (where they are on).
        ``zero_empty`` (the unconditional branch of sampling) with ``force_zeros_for_empty_prompt``: "" gives
        zero text outputs."""
        outputs: dict[str, list[torch.Tensor]] = {}
        for module in self.embedders:
            key = input_key(module)
            if key not in batch:
                raise KeyError(
                    f"the conditioner's embedder {type(module).__name__} reads batch[{key!r}], which this "
                    f"batch lacks (it has {sorted(batch)})"
                )
            values, keep = batch[key], None
            rate = self.ucg_rate_of(module, ucg_rate)
            if draw is not None and rate > 0:
                keep = draw((len(values),)) >= rate
                if _is_text(values):
                    values, keep = [v if k else "" for v, k in zip(values, keep.tolist())], None
            if zero_empty and self.force_zeros_for_empty_prompt and _is_text(values):
                keep = torch.tensor([v != "" for v in values])
            for name, tensor in self._embed(module, values, device, use_cache).items():
                if keep is not None:
                    tensor = tensor * keep.to(tensor).view(-1, *[1] * (tensor.ndim - 1))
                outputs.setdefault(name, []).append(tensor)
        return {
            name: parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1) for name, parts in outputs.items()
        }

    @staticmethod
    def _embed(module: nn.Module, values: Any, device, use_cache: bool) -> dict[str, torch.Tensor]:
        if _is_text(values):
            values = list(values)
            if use_cache and hasattr(module, "encode_cached"):
                result = module.encode_cached(values, device=device)
            else:
                result = module(values)
        else:
            result = module(values)
        if isinstance(result, Mapping):
            return dict(result)
        if result.ndim not in OUTPUT_KEYS:
            raise ValueError(
                f"embedder {type(module).__name__} returned a {result.ndim}-d tensor; expected "
                "[B, T, D] (context), [B, V] (vector) or a dict of them"
            )
        return {OUTPUT_KEYS[result.ndim]: result}


def as_conditioner(parts: Conditioner | nn.Module | Sequence[nn.Module]) -> Conditioner:
    """A ``Conditioner`` as is; a text encoder (or a list of embedders) wrapped in one."""
    if isinstance(parts, Conditioner):
        return parts
    return Conditioner(list(parts) if isinstance(parts, (list, tuple)) else [parts])
