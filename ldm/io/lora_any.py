"""Any LoRA file in: tell kohya from diffusers/PEFT by its keys, then load it with that format's reader."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from ldm.io.bundled_embeddings import BUNDLE_PREFIX, has_bundled, split_bundled
from ldm.io.kohya_lora import load_kohya_lora
from ldm.io.peft_lora import load_peft_lora
from ldm.io.safe_load import load_safetensors_file, open_safetensors

__all__ = ["load_lora", "lora_format"]

_PEFT_KEY = re.compile(r"(unet|text_encoder)\..+\.lora_[AB]\.weight")


def lora_format(keys: Iterable[str], source: str = "LoRA file") -> str:
    """``"kohya"`` (``lora_unet_*`` / ``lora_te_*``) or ``"peft"`` (``unet.*`` / ``text_encoder.*`` ending in
    ``.lora_A.weight`` / ``.lora_B.weight``); anything else raises ``ValueError`` saying what it looks
    like."""
    keys = list(keys)
    if not keys:
        raise ValueError(f"{source}: no tensors")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if all(_PEFT_KEY.fullmatch(k) for k in keys):
        return "peft"
    hints = {
        "base_model.model.": (
            "a raw PEFT adapter (save it with diffusers' save_lora_weights, or prefix unet.)"
        ),
        ".lora.down.weight": "diffusers' pre-PEFT attention-processor LoRA",
        "lora_te2_": "an SDXL LoRA (SD v1/v2 only)",
        "hada_": "a LyCORIS LoHa (LoRA only)",
        "lokr_": "a LyCORIS LoKr (LoRA only)",
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
    **kwargs: Any,
) -> dict[str, Any]:
    """Load a kohya or diffusers/PEFT LoRA ``.safetensors`` (detected from its keys); the summary of
    ``load_kohya_lora`` / ``load_peft_lora`` plus ``format``. Bundled embeddings (``bundle_emb.*``,
    ``ldm.io.bundled_embeddings``) are left out here: ``read_bundled_embeddings`` reads them."""
    with open_safetensors(path) as handle:
        names = handle.keys()
    keys = [k for k in names if not k.startswith(BUNDLE_PREFIX)]
    kind = lora_format(keys, str(path))
    loader = load_kohya_lora if kind == "kohya" else load_peft_lora
    source = split_bundled(load_safetensors_file(path), str(path))[0] if has_bundled(path) else path
    summary = loader(
        source, unet=unet, text_encoder=text_encoder, multiplier=multiplier, merge=merge, **kwargs
    )
    summary["format"] = kind
    return summary
