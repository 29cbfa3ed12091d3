"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): low-rank deltas on the UNet's
attention/transformer layers (and optionally the text encoder). Exports kohya's ``.safetensors`` (which
AUTOMATIC1111, ComfyUI, kohya sd-scripts and diffusers load) or diffusers' PEFT layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.io.kohya_lora import save_kohya_lora
from ldm.io.lycoris_lora import save_lycoris_lora
from ldm.io.peft_dora import save_peft_dora
from ldm.io.peft_lora import save_peft_lora
from ldm.io.sdxl_lora import save_sdxl_lora
from ldm.models.finetune.method import FineTuneMethod, check_state_keys, scaled
from ldm.models.finetune.text_parts import text_parts
from ldm.modules.adapters import lora as lora_lib
from ldm.modules.adapters.algorithms import ALGORITHMS, adapter_factory

PRESETS = {
    name: getattr(lora_lib, name)
    for name in (
        "UNET_ATTENTION",
        "UNET_ATTENTION_PROJ",
        "UNET_FF",
        "UNET_TRANSFORMER",
        "UNET_CONV",
        "TEXT_ENCODER",
        "TEXT_ENCODER_MLP",
        "TEXT_ENCODER_ALL",
    )
}


def expand_targets(targets: Sequence[str] | str | None) -> list[str]:
    """Preset names (``UNET_ATTENTION``...) and/or module-name globs -> globs."""
    if not targets:
        return []
    out: list[str] = []
    for t in [targets] if isinstance(targets, str) else targets:
        out += list(PRESETS[t]) if t in PRESETS else [t]
    return out


class LoRA(FineTuneMethod):
    """rank/alpha (scale alpha/rank), dropout on the LoRA input, targets as presets or module globs;
    ``text_encoder_targets`` apply to each text encoder of the base, or to those ``text_encoders`` lists
    (SDXL: ``[1]`` CLIP-L, ``[2]`` bigG, null both); ``export_format``: "kohya" or "peft". ``algo``: lora,
    locon (LoRA with ``UNET_CONV`` added to the UNet targets), loha, lokr or dora
    (``ldm.modules.adapters.algorithms``; SDXL too); ``conv_rank`` / ``conv_alpha``: the 3x3
    convolutions' own rank and alpha (kohya's ``conv_dim`` / ``conv_alpha``; default ``rank`` / ``alpha``);
    ``factor``, ``decompose_both``, ``full_matrix``: LoKr's."""

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        unet_targets: Sequence[str] | str = "UNET_ATTENTION",
        text_encoder_targets: Sequence[str] | str | None = None,
        export_format: str = "kohya",
        text_encoders: Sequence[int] | None = None,
        algo: str = "lora",
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
    ):
        super().__init__()
        if export_format not in ("kohya", "peft"):
            raise ValueError(f"model.method.export_format must be 'kohya' or 'peft', got {export_format!r}")
        if algo not in ALGORITHMS:
            raise ValueError(f"model.method.algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
        if export_format == "peft" and algo in ("loha", "lokr"):
            raise ValueError(
                f"model.method.algo={algo} has no PEFT layout: use model.method.export_format=kohya"
            )
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets = {
            "unet": expand_targets(unet_targets),
            "text_encoder": expand_targets(text_encoder_targets),
        }
        if algo == "locon":
            self.targets["unet"] += [t for t in PRESETS["UNET_CONV"] if t not in self.targets["unet"]]
        self.algo, self.factor = algo, factor
        self.factory = adapter_factory(
            algo, rank, alpha, dropout, conv_rank, conv_alpha, factor, decompose_both, full_matrix
        )
        self.export_format = export_format
        self.text_encoders = None if text_encoders is None else [int(i) for i in text_encoders]
        self.trains_text_encoder = bool(self.targets["text_encoder"])

    def _modules(self) -> dict[str, nn.Module]:
        """``unet``, ``text_encoder`` (and SDXL's ``text_encoder_2``): the names checkpoints and files use."""
        return {"unet": self.model.unet, **text_parts(self.model)}

    def attach(self, model) -> None:
        texts = list(text_parts(model).values())
        chosen = range(1, len(texts) + 1) if self.text_encoders is None else self.text_encoders
        if any(not 1 <= i <= len(texts) for i in chosen):  # checked before anything is injected
            raise ValueError(
                f"model.method.text_encoders={self.text_encoders}: this base has {len(texts)} text "
                f"encoder(s), numbered 1..{len(texts)} (SDXL: 1 = CLIP-L, 2 = bigG)"
            )
        self.model = model
        lora_lib.inject_lora(model.unet, self.targets["unet"], factory=self.factory)
        for i in chosen if self.targets["text_encoder"] else ():
            lora_lib.inject_lora(texts[i - 1].transformer, self.targets["text_encoder"], factory=self.factory)

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self._modules().values() for p in lora_lib.lora_parameters(part)]

    def train_modules(self) -> list[nn.Module]:
        return [m for part in self._modules().values() for m in lora_lib.lora_modules(part).values()]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            f"{part}.{k}": v
            for part, module in self._modules().items()
            for k, v in lora_lib.lora_state_dict(module).items()
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_keys(set(self.state_dict()), state, "LoRA checkpoint")
        for part, module in self._modules().items():
            prefix = f"{part}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                lora_lib.load_lora_state_dict(module, sub)

    def disabled(self):
        def set_multiplier(value: float) -> None:
            for module in self._modules().values():
                lora_lib.set_lora_multiplier(module, value)

        return scaled(set_multiplier, on=1.0)

    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        parts = {k: v for k, v in self._modules().items() if k == "unet" or lora_lib.lora_modules(v)}
        base = metadata.get("base") or "unknown"  # a file name, never a local path
        info = {
            "ss_training_comment": f"ldm-lightning LoRA, base: {base}",
            "ss_sd_model_name": base,
            "ss_new_sd_model_hash": metadata.get("base_sha256", ""),
            "ss_steps": metadata.get("steps", 0),
            "ss_resolution": metadata.get("resolution", ""),
        }
        if len(text_parts(self.model)) > 1:  # SDXL: lora_te1_ / lora_te2_, or text_encoder(_2).
            return save_sdxl_lora(path, parts, info, self.export_format, factor=self.factor)
        te = parts.get("text_encoder")
        if self.export_format == "peft":
            save = save_peft_dora if self.algo == "dora" else save_peft_lora
        elif self.algo in ("lora", "locon"):
            save = save_kohya_lora
        else:
            return save_lycoris_lora(path, self.model.unet, te, info, factor=self.factor)
        return save(path, unet=self.model.unet, text_encoder=te, metadata=info)
