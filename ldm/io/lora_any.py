"""Any LoRA file in: tell kohya from diffusers/PEFT by its keys, then load it with that format's reader."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ldm.io.bundled_embeddings import BUNDLE_PREFIX, has_bundled, split_bundled
from ldm.io.kohya_lora import load_kohya_lora
from ldm.io.lycoris_lora import load_lycoris_lora
from ldm.io.peft_lora import load_peft_lora
from ldm.io.safe_load import load_safetensors_file, open_safetensors, read_safetensors_metadata
from ldm.io.sdxl_lora import is_sdxl_lora, load_sdxl_lora

__all__ = ["load_lora", "lora_format"]

_PEFT_KEY = re.compile(r"(unet|text_encoder)\..+\.(lora_[AB]\.weight|lora_magnitude_vector)")
_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def lora_format(keys: Iterable[str], source: str = "LoRA file") -> str:
    """``"kohya"`` (``lora_unet_*`` / ``lora_te_*``), ``"lycoris"`` (kohya names with LyCORIS tensors: LoHa,
    LoKr, DoRA, or ones we do not read, which its loader names) or ``"peft"`` (``unet.*`` /
    ``text_encoder.*`` ending in ``.lora_A.weight`` / ``.lora_B.weight``); anything else raises
    ``ValueError`` saying what it looks like."""
    keys = list(keys)
    if not keys:
        raise ValueError(f"{source}: no tensors")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya" if all(k.partition(".")[2] in _KOHYA_SUFFIXES for k in keys) else "lycoris"
    if all(_PEFT_KEY.fullmatch(k) for k in keys):
        return "peft"
    hints = {
        "base_model.model.": (
            "a raw PEFT adapter (save it with diffusers' save_lora_weights, or prefix unet.)"
        ),
        ".lora.down.weight": "diffusers' pre-PEFT attention-processor LoRA",
        "lora_te2_": "an SDXL LoRA (it fits an SDXL base)",
    }
    seen = next((what for marker, what in hints.items() if any(marker in k for k in keys)), None)
    raise ValueError(
        f"{source}: neither a kohya LoRA (lora_unet_* / lora_te_*) nor a diffusers/PEFT LoRA (unet.* / "
        f"text_encoder.* ... .lora_A/.lora_B.weight)"
        + (f"; it looks like {seen}" if seen else "")
        + f"; first keys: {keys[:3]}"
    )


def load_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    multiplier: float = 1.0,
    merge: bool = False,
    text_encoders: Sequence[nn.Module] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load a kohya LoRA, LyCORIS (LoHa / LoKr / DoRA) or diffusers/PEFT LoRA (DoRA too) ``.safetensors``
    (detected from its keys); the summary of ``load_kohya_lora`` / ``load_lycoris_lora`` / ``load_peft_lora``
    plus ``format``. Bundled embeddings (``bundle_emb.*``, ``ldm.io.bundled_embeddings``) are left out here:
    ``read_bundled_embeddings`` reads them. ``text_encoders``: the base's text encoders in
    order (instead of ``text_encoder``); with two (SDXL) the file is read by ``ldm.io.sdxl_lora``. A file
    of the other family (an SDXL LoRA on an SD 1.x/2.x base, or the reverse) is a ``ValueError`` saying so."""
    texts = list(text_encoders) if text_encoders is not None else [text_encoder]
    if len(texts) > 1:
        parts = {"unet": unet, **{f"text_encoder{f'_{i + 1}' if i else ''}": t for i, t in enumerate(texts)}}
        return load_sdxl_lora(path, parts, multiplier=multiplier, merge=merge, **kwargs)
    with open_safetensors(path) as handle:
        names = handle.keys()
    keys = [k for k in names if not k.startswith(BUNDLE_PREFIX)]
    if is_sdxl_lora(keys, read_safetensors_metadata(path)):
        raise ValueError(
            f"{path} is an SDXL LoRA (lora_te1_/lora_te2_ or text_encoder_2 keys, or SDXL metadata); "
            "this base "
            "is an SD 1.x/2.x model (one text encoder), which takes SD 1.x/2.x LoRAs (lora_unet_* + "
            "lora_te_*, or unet.* / text_encoder.*). Use it with an SDXL base"
        )
    kind = lora_format(keys, str(path))
    loader = {"kohya": load_kohya_lora, "lycoris": load_lycoris_lora, "peft": load_peft_lora}[kind]
    source = split_bundled(load_safetensors_file(path), str(path))[0] if has_bundled(path) else path
    summary = loader(source, unet=unet, text_encoder=texts[0], multiplier=multiplier, merge=merge, **kwargs)
    summary["format"] = kind
    return summary
