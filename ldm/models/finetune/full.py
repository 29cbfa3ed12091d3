"""Full fine-tuning of the UNet (DreamBooth's default, Ruiz et al. 2022), optionally with the text encoder.

Every UNet weight trains (and, with ``train_text_encoder``, every weight of the text encoder's transformer,
with its own learning rate). Checkpoints hold exactly the trained parts; the exported file is a Stable
Diffusion single ``.safetensors`` (the exporter ``scripts/convert.py`` uses), which AUTOMATIC1111, ComfyUI
and diffusers' ``from_single_file`` load. The fine-tuned model cannot switch itself off (``disabled()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.io.single_file_export import export_single_file
from ldm.models.finetune.method import FineTuneMethod, check_state_keys
from ldm.models.finetune.text_parts import text_parts

UNET_PREFIX, TEXT_PREFIX = "unet.", "text_encoder."  # SDXL's second text encoder: text_encoder_2.


class FullUNet(FineTuneMethod):
    """train_text_encoder: also train the text encoder (its prompt cache is then off).
    text_encoder_lr: its learning rate (None: the optimiser's). export_dtype: of the SD single file."""

    def __init__(
        self,
        train_text_encoder: bool = False,
        text_encoder_lr: float | None = None,
        export_dtype: str = "float16",
    ):
        super().__init__()
        if text_encoder_lr is not None and not train_text_encoder:
            raise ValueError(
                "text_encoder_lr is set but train_text_encoder is false: set "
                "model.method.train_text_encoder=true, or drop text_encoder_lr"
            )
        self.train_text_encoder = bool(train_text_encoder)
        self.trains_text_encoder = self.train_text_encoder
        self.text_encoder_lr = text_encoder_lr
        self.export_dtype = export_dtype

    def _unet(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                "FullUNet is not attached to a model yet (FineTuneModule calls attach in setup)"
            )
        return self.model.unet

    def _text_transformers(self) -> dict[str, nn.Module]:
        """``{"text_encoder": its transformer, ("text_encoder_2": ...)}`` when they train, else empty."""
        if not self.train_text_encoder or self.model is None:
            return {}
        return {name: encoder.transformer for name, encoder in text_parts(self.model).items()}

    # -- building --------------------------------------------------------------------------------------
    def attach(self, model) -> None:
        self.model = model
        model.unet.requires_grad_(True)
        if self.train_text_encoder:
            for encoder in text_parts(model).values():
                encoder.unfreeze()  # also clears its prompt cache

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": list(self._unet().parameters()), "name": "unet"}]
        lr = {} if self.text_encoder_lr is None else {"lr": float(self.text_encoder_lr)}
        for name, text in self._text_transformers().items():
            groups.append({"params": list(text.parameters()), "name": name, **lr})
        return groups

    def train_modules(self) -> list[nn.Module]:
        return [self._unet(), *(text_parts(self.model).values() if self.train_text_encoder else ())]

    # -- what checkpoints hold -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {UNET_PREFIX + k: v for k, v in self._unet().state_dict().items()}
        for name, text in self._text_transformers().items():
            state.update({f"{name}.{k}": v for k, v in text.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_keys(set(self.state_dict()), state, "FullUNet")
        self._unet().load_state_dict(
            {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, strict=True
        )
        for name, text in self._text_transformers().items():
            prefix = f"{name}."
            text.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            text_parts(self.model)[name].clear_cache()

    # -- output ----------------------------------------------------------------------------------------
    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        """The whole fine-tuned model as an SD single file (the module swaps in EMA weights when it keeps
        them); an SDXL base gives an SDXL single file (sgm's layout: bigG under
        ``conditioner.embedders.1.model``) that AUTOMATIC1111, ComfyUI and ``from_single_file`` load."""
        model = self.model
        texts = list(text_parts(model).values())
        return export_single_file(
            Path(path).with_suffix(".safetensors"),
            self._unet(),
            model.vae,
            texts[0],
            text_encoder_2=texts[1] if len(texts) > 1 else None,
            schedule=model.schedule,
            parameterization=model.hparams.parameterization,
            scale_factor=float(model.scale_factor),
            resolution=getattr(model, "image_resolution", None),
            dtype=self.export_dtype,
            metadata={"ldm.method": "dreambooth-full-unet", **dict(metadata)},
        )
