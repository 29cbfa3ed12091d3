"""Keep the console to what a user acts on: drop third-party lines that carry nothing for this project.

Each entry says why it is safe to drop. What we cause ourselves is fixed where it arises instead (the batch
size is passed to ``self.log``, the progress bar counts steps, the model summary has no FLOPs column, the
wandb logger does not pass the deprecated ``anonymous`` setting: see ``callbacks/``).
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category, why it is safe to ignore); also listed in pyproject's pytest filterwarnings.
IGNORED_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r".*isinstance\(treespec, LeafSpec\)` is deprecated",
        Warning,
        "raised inside lightning/pytorch/utilities/_pytree.py under torch >= 2.9; nothing our code calls",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        Warning,
        (
            "the frozen VAE / text encoder / base are in eval mode on purpose; callbacks.model_summary "
            "checks instead that no module with trainable parameters is in eval mode"
        ),
    ),
    (
        r"Precision bf16-mixed is not supported by the model summary",
        Warning,
        (
            "under trainer.precision=bf16-mixed Lightning's summary sizes the fp32 weights (which is what "
            "they are: mixed precision keeps fp32 weights), and warns every run"
        ),
    ),
    (
        r"The dirpath has changed from .* won't be reloaded",
        Warning,
        (
            "a resumed run writes into its own new run folder on purpose; the run summary says when the best "
            "checkpoint is the one of the run it resumed from"
        ),
    ),
)

# Lightning info lines (logger name, text they contain, why they go).
DROPPED_LOG_LINES: tuple[tuple[str, str, str], ...] = (
    (
        "lightning.pytorch.utilities.rank_zero",
        "litlogger",
        "an advert for a cloud service, printed every run",
    ),
)


class _DropContaining(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Install the filters above (idempotent)."""
    for pattern, category, _why in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, text, _why in DROPPED_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(_DropContaining(text))
