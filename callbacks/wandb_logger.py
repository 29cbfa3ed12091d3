"""Lightning's WandbLogger without the setting wandb deprecated.

Lightning passes ``anonymous=None`` to ``wandb.init``; wandb >= 0.22 warns on any value given for it ("The
anonymous setting has no effect"), on every run. This logger leaves the key out; otherwise unchanged.
"""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
