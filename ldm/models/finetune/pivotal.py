"""Pivotal tuning: a new token (textual inversion) and a LoRA trained together in one run, each with its own
learning rate, the token optionally frozen after a fraction of the steps -- what diffusers' advanced
DreamBooth-LoRA script and cog-sdxl do. It composes the two existing methods; the core sees one method.

Export: the LoRA file (kohya) with the token bundled as ``bundle_emb.<token>.string_to_param.*`` (SDXL:
``bundle_emb.<token>.clip_l`` / ``.clip_g``; what kohya and AUTOMATIC1111 read; ``sample.py --lora`` adds the
token too), and the embedding on its own beside it (``<name>_emb.safetensors``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.io.bundled_embeddings import add_bundled_embeddings, bundle_key
from ldm.models.finetune.lora import LoRA
from ldm.models.finetune.method import FineTuneMethod, check_state_keys
from ldm.models.finetune.textual_inversion import TextualInversion

PARTS = ("textual_inversion", "lora")


class PivotalTuning(FineTuneMethod):
    """textual_inversion / lora: the two methods (their own configs); token_lr: the vectors' learning rate
    (None: the optimiser's); ti_stop_fraction: the token trains for the first ``ceil(fraction x total
    steps)`` steps, then stays fixed while the LoRA goes on (1.0: all along); bundle_embedding: put the token
    into the kohya LoRA file too."""

    trains_text_encoder = True

    def __init__(
        self,
        textual_inversion: TextualInversion,
        lora: LoRA,
        token_lr: float | None = None,
        ti_stop_fraction: float = 1.0,
        bundle_embedding: bool = True,
    ):
        super().__init__()
        if not 0.0 < float(ti_stop_fraction) <= 1.0:
            raise ValueError(f"model.method.ti_stop_fraction must be in (0, 1], got {ti_stop_fraction}")
        if bundle_embedding:
            bundle_key(textual_inversion.placeholder)  # a token that cannot be a key fails now, not at export
        self.parts: dict[str, FineTuneMethod] = {"textual_inversion": textual_inversion, "lora": lora}
        self.textual_inversion, self.lora = textual_inversion, lora
        self.token_lr = None if token_lr is None else float(token_lr)
        self.ti_stop_fraction = float(ti_stop_fraction)
        self.bundle_embedding = bool(bundle_embedding)
        self.token_trains = True

    def attach(self, model) -> None:
        self.model = model
        for part in self.parts.values():
            part.attach(model)

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts.values() for p in part.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        token_groups = self.textual_inversion.param_groups()
        if self.token_lr is not None:
            token_groups = [{**group, "lr": self.token_lr} for group in token_groups]
        return [*token_groups, *self.lora.param_groups()]

    def train_modules(self) -> list[nn.Module]:
        return [m for part in self.parts.values() for m in part.train_modules()]

    def before_step(self, step: int, total_steps: int | None) -> None:
        """Freeze the token from step ``ceil(ti_stop_fraction x total_steps)`` on (its vectors get no
        gradient, so no optimiser moves them); a function of the step only, so a resumed run agrees."""
        stops = self.ti_stop_fraction < 1.0 and bool(total_steps)
        self.token_trains = not stops or step < math.ceil(self.ti_stop_fraction * total_steps)
        for vectors in self.textual_inversion.parameters():
            vectors.requires_grad_(self.token_trains)
            if not self.token_trains:
                vectors.grad = None

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{name}.{k}": v for name, part in self.parts.items() for k, v in part.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_keys(set(self.state_dict()), state, "pivotal tuning checkpoint")
        for name, part in self.parts.items():
            prefix = f"{name}."
            part.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts.values():
                stack.enter_context(part.disabled())
            yield

    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        path = Path(path)
        lora_path = Path(self.lora.export(path, metadata))
        self.textual_inversion.export(lora_path.with_name(f"{lora_path.stem}_emb.safetensors"), metadata)
        if self.bundle_embedding and self.lora.export_format == "kohya":
            sets = [v.detach() for v in self.textual_inversion.parameters()]  # SDXL: clip_l, clip_g
            vectors = sets[0] if len(sets) == 1 else sets
            add_bundled_embeddings(lora_path, {self.textual_inversion.placeholder: vectors})
        return lora_path
