"""LoRA fine-tuning (Hu et al. 2021): low-rank deltas on the UNet's attention (and optionally the text
encoder); the file it exports is kohya's ``.safetensors`` format that AUTOMATIC1111, ComfyUI and diffusers load."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ldm.io.kohya_lora import save_kohya_lora
from ldm.io.peft_lora import save_peft_lora
from ldm.models.finetune.base import FineTuneModule
from ldm.modules.adapters import lora as lora_lib

PRESETS = {name: getattr(lora_lib, name) for name in ("UNET_ATTENTION", "UNET_ATTENTION_PROJ", "UNET_FF",
                                                       "UNET_TRANSFORMER", "UNET_CONV", "TEXT_ENCODER",
                                                       "TEXT_ENCODER_MLP", "TEXT_ENCODER_ALL")}


def expand_targets(targets: Sequence[str] | str | None) -> list[str]:
    """Preset names (``UNET_ATTENTION``...) and/or module-name globs -> globs."""
    if not targets:
        return []
    out: list[str] = []
    for t in [targets] if isinstance(targets, str) else targets:
        out += list(PRESETS[t]) if t in PRESETS else [t]
    return out


class LoRAFineTune(FineTuneModule):
    def __init__(self, *args, rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                 unet_targets: Sequence[str] | str = "UNET_ATTENTION",
                 text_encoder_targets: Sequence[str] | str | None = None, export_format: str = "kohya",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if export_format not in ("kohya", "peft"):
            raise ValueError(f"export_format must be 'kohya' or 'peft', got {export_format!r}")

    def add_adapters(self) -> None:
        hp = self.hparams
        lora_lib.inject_lora(self.unet, expand_targets(hp.unet_targets), hp.rank, hp.alpha, hp.dropout)
        te_targets = expand_targets(hp.text_encoder_targets)
        if te_targets:
            lora_lib.inject_lora(self.text_encoder.transformer, te_targets, hp.rank, hp.alpha, hp.dropout)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return lora_lib.lora_parameters(self.unet) + lora_lib.lora_parameters(self.text_encoder)

    @contextlib.contextmanager
    def adapter_disabled(self):
        for model in (self.unet, self.text_encoder):
            lora_lib.set_lora_multiplier(model, 0.0)
        try:
            yield
        finally:
            for model in (self.unet, self.text_encoder):
                lora_lib.set_lora_multiplier(model, 1.0)

    def export_adapter(self, path: str | Path) -> Path:
        te = self.text_encoder if lora_lib.lora_modules(self.text_encoder) else None
        metadata = {"ss_training_comment": f"ldm-lightning LoRA, base: {self.hparams.base or 'latest run'}",
                    "ss_steps": self.global_step, "ss_resolution": getattr(self, "image_resolution", "")}
        save = save_kohya_lora if self.hparams.export_format == "kohya" else save_peft_lora
        return save(path, unet=self.unet, text_encoder=te, metadata=metadata)
