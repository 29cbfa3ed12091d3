"""Hypernetwork fine-tuning (AUTOMATIC1111 / NovelAI): per context width, a pair of small MLPs rewrites the
text context before the cross-attention keys and values (``ldm/modules/adapters/hypernetwork.py``); the base
stays frozen. The file it exports is AUTOMATIC1111's ``.pt`` (or ``.safetensors``), see
``ldm/io/hypernetwork_file.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ldm.io.hypernetwork_file import save_hypernetwork
from ldm.models.finetune.method import FineTuneMethod, check_state_keys, scaled
from ldm.modules.adapters import hypernetwork as hn

if TYPE_CHECKING:
    from ldm.models.finetune.module import FineTuneModule


class Hypernetwork(FineTuneMethod):
    """Options mirror AUTOMATIC1111's "Create hypernetwork" form.

    widths: K/V input widths to cover (``None``: every cross-attention context width of the base, e.g. 768).
    self_attention: also rewrite self-attention inputs of covered widths (AUTOMATIC1111 does, by width).
    layer_structure / activation / weight_init / layer_norm / activate_output: the MLP (module docstring).
    use_dropout / dropout / last_layer_dropout: AUTOMATIC1111's dropout rule (``dropout_structure_for``);
        ``dropout_structure`` (one probability per layer_structure entry) overrides it.
    zero_last_layer: start as the exact identity (AUTOMATIC1111's ``Normal`` init starts near it).
    strength: the multiplier on the MLP output while training and sampling; ``disabled()`` sets it to 0.
    lr: the MLPs' learning rate (``None``: ``model.optimizer.lr``). One MLP pair feeds every cross-attention
        layer, so it needs a much smaller rate than LoRA (AUTOMATIC1111's default: 1e-5 on SD v1).
    export_format: ``pt`` (AUTOMATIC1111) or ``safetensors``.
    """

    export_suffix = ".pt"

    def __init__(
        self,
        widths: Sequence[int] | None = None,
        self_attention: bool = False,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation: str = "linear",
        weight_init: str = "Normal",
        layer_norm: bool = False,
        activate_output: bool = False,
        use_dropout: bool = False,
        dropout: float = 0.3,
        last_layer_dropout: bool = False,
        dropout_structure: Sequence[float] | None = None,
        zero_last_layer: bool = False,
        strength: float = 1.0,
        lr: float | None = None,
        export_format: str = "pt",
    ):
        super().__init__()
        if export_format not in ("pt", "safetensors"):
            raise ValueError(
                f"model.method.export_format must be 'pt' or 'safetensors', got {export_format!r}"
            )
        self.export_suffix = f".{export_format}"
        self.widths = list(widths) if widths else None
        self.self_attention = bool(self_attention)
        if dropout_structure is None:
            dropout_structure = hn.dropout_structure_for(
                layer_structure, use_dropout, last_layer_dropout, dropout
            )
        self.options = {
            "layer_structure": list(layer_structure),
            "activation": activation,
            "weight_init": weight_init,
            "layer_norm": layer_norm,
            "activate_output": activate_output,
            "dropout_structure": list(dropout_structure),
            "zero_last_layer": zero_last_layer,
        }
        self.strength = float(strength)
        self.lr = lr
        self.network: hn.Hypernetwork | None = None
        self.attached: list[str] = []

    # -- building --------------------------------------------------------------------------------------
    def attach(self, model: FineTuneModule) -> None:
        widths = self.widths or hn.attention_widths(model.unet, self.self_attention)
        if not widths:
            raise ValueError("the base UNet has no cross-attention layers for a hypernetwork to rewrite")
        self._check_widths_train(model.unet, widths)
        self.network = hn.Hypernetwork(widths, **self.options).to(next(model.unet.parameters()).device)
        self.network.strength = self.strength
        # moves with the model (.to, DDP); not part of the UNet
        model.add_module("hypernetwork", self.network)
        self.attached = hn.attach_hypernetwork(model.unet, self.network, self.self_attention)
        self.model = model

    def _check_widths_train(self, unet: nn.Module, widths: Sequence[int]) -> None:
        """Every width must reach an attention layer: an MLP that never trains would still be saved, and
        AUTOMATIC1111 applies every width a file holds (to its self-attention layers of that width)."""
        reached = hn.attention_widths(unet, self.self_attention)
        unused = [w for w in widths if w not in reached]
        if not unused:
            return
        if not self.self_attention and set(unused) <= set(hn.attention_widths(unet, True)):
            raise ValueError(
                f"model.method.widths {list(widths)}: {unused} are only self-attention widths of this "
                "UNet, which model.method.self_attention=false leaves alone, so their MLPs would be saved "
                "untrained (and AUTOMATIC1111 applies every width in a file): drop them from "
                "model.method.widths or set model.method.self_attention=true"
            )
        raise ValueError(
            f"model.method.widths {list(widths)}: no attention layer of this UNet takes {unused} wide K/V "
            f"inputs (it has {hn.attention_widths(unet, True)}): drop them from model.method.widths"
        )

    def _require_network(self) -> hn.Hypernetwork:
        if self.network is None:
            raise RuntimeError("Hypernetwork.attach(model) must run before the method is used")
        return self.network

    def parameters(self) -> list[nn.Parameter]:
        return list(self._require_network().parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": self.parameters()}
        if self.lr is not None:
            group["lr"] = float(self.lr)
        return [group]

    def train_modules(self) -> list[nn.Module]:
        return [self._require_network()]

    # -- what checkpoints hold -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {f"hypernetwork.{k}": v for k, v in self._require_network().state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_keys(set(self.state_dict()), state, "hypernetwork")
        self._require_network().load_state_dict(
            {k.removeprefix("hypernetwork."): v for k, v in state.items()}
        )

    # -- behaviour -------------------------------------------------------------------------------------
    def disabled(self) -> contextlib.AbstractContextManager:
        return scaled(self._require_network().set_strength, on=self.strength, off=0.0)

    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        path = Path(path)
        if path.suffix not in (".pt", ".safetensors"):
            path = path.with_suffix(self.export_suffix)
        base = metadata.get("base") or metadata.get("sd_checkpoint_name")
        info = {
            "name": metadata.get("name") or path.stem,
            "step": metadata.get("steps") or 0,
            "sd_checkpoint": metadata.get("sd_checkpoint"),
            "sd_checkpoint_name": Path(str(base)).name if base else None,
            "optional_info": f"ldm-lightning hypernetwork, base: {base or 'latest run'}",
        }
        return save_hypernetwork(path, self._require_network(), self_attention=self.self_attention, **info)
