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

UNET_PREFIX, TEXT_PREFIX = "unet.", "text_encoder."


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

    def _text_transformer(self) -> nn.Module | None:
        return (
            self.model.text_encoder.transformer
            if self.train_text_encoder and self.model is not None
            else None
        )

    # -- building --------------------------------------------------------------------------------------
    def attach(self, model) -> None:
        self.model = model
        model.unet.requires_grad_(True)
        if self.train_text_encoder:
            model.text_encoder.unfreeze()  # also clears its prompt cache

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": list(self._unet().parameters()), "name": "unet"}]
        text = self._text_transformer()
        if text is not None:
            lr = {} if self.text_encoder_lr is None else {"lr": float(self.text_encoder_lr)}
            groups.append({"params": list(text.parameters()), "name": "text_encoder", **lr})
        return groups

    def train_modules(self) -> list[nn.Module]:
        return [self._unet()] + ([self.model.text_encoder] if self.train_text_encoder else [])

    # -- what checkpoints hold -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {UNET_PREFIX + k: v for k, v in self._unet().state_dict().items()}
        text = self._text_transformer()
        if text is not None:
            state.update({TEXT_PREFIX + k: v for k, v in text.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_keys(set(self.state_dict()), state, "FullUNet")
        self._unet().load_state_dict(
            {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, strict=True
        )
        text = self._text_transformer()
        if text is not None:
            text.load_state_dict(
                {k[len(TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}, strict=True
            )
            self.model.text_encoder.clear_cache()

    # -- output ----------------------------------------------------------------------------------------
    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        """The whole fine-tuned model as an SD single file (the module swaps in EMA weights when it keeps
        them)."""
        model = self.model
        return export_single_file(
            Path(path).with_suffix(".safetensors"),
            self._unet(),
            model.vae,
            model.text_encoder,
            schedule=model.schedule,
            parameterization=model.hparams.parameterization,
            scale_factor=float(model.scale_factor),
            resolution=getattr(model, "image_resolution", None),
            dtype=self.export_dtype,
            metadata={"ldm.method": "dreambooth-full-unet", **dict(metadata)},
        )
