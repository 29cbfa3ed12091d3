"""The model summary at the start of fit, without what is not measured, plus a train-mode check that knows
frozen parts.

Lightning's rich summary adds a FLOPs column that is all zeros unless the model sets
``example_input_array`` (ours take dict batches, so it never does), and warns about every module in eval
mode, which for latent diffusion is the frozen VAE and text encoder, on purpose. This summary leaves the
FLOPs out, and on train start warns only about modules that hold trainable parameters yet are in eval mode
(dropout / normalisation would then silently behave as at inference).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from ldm.utils.logging import get_logger

log = get_logger(__name__)


class ModelSummary(RichModelSummary):
    @staticmethod
    def summarize(
        summary_data,
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict,
        total_flops: int,
        **summarize_kwargs,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        if total_flops == 0:  # not measured: drop the column instead of printing zeros
            summary_data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in summary_data:
            table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left")
        for row in zip(*(values for _, values in summary_data)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}   "
            f"[bold]Frozen params[/]: {get_human_readable_count(int(frozen))}   "
            f"[bold]Size[/]: {model_size:,.1f} MB"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrong = [
            name
            for name, module in pl_module.named_modules()
            if not module.training and any(p.requires_grad for p in module.parameters(recurse=False))
        ]
        if wrong:
            log.warning(
                f"{len(wrong)} module(s) with trainable parameters are in eval mode at the start of "
                f"training (dropout/normalisation act as at inference): {wrong[:5]}"
            )
