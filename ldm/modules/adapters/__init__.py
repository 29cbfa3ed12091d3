"""Parameter-efficient adapters as plain ``nn.Module``s (no Lightning): LoRA, ..."""

from ldm.modules.adapters import lora
from ldm.modules.adapters.lora import *

__all__ = list(lora.__all__)
