"""``torch.compile`` of a network in place: the whole module, or each of its repeated blocks.

``model.compile`` / ``sample.py --compile``:

- ``whole`` (or ``true``): ``module.compile()`` -- one graph for the whole UNet / VAE (longest compile, most
  fusion);
- ``blocks``: ``compile()`` on every repeated block (the UNet's ``ResBlock`` and ``BasicTransformerBlock``,
  the VAE's ``ResnetBlock`` and ``AttnBlock``), as diffusers' ``compile_repeated_blocks`` does: blocks of the
  same shape share one compiled graph, so compile time grows with the number of distinct block shapes, not
  with depth.

Compiling in place (``nn.Module.compile``) keeps the module tree as it is: ``state_dict`` keys, EMA copies,
exports and adapter files hold the original names (no ``_orig_mod.``), and adapters attached before the
compile (LoRA layers inside a block) are traced with it and train. Compilation itself is lazy: it happens
at the first call (see ``CompileClock`` in ``ldm/models/compile_clock.py`` for its time).
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

CHOICES = ("false", "true", "whole", "blocks")
REPEATED_BLOCKS = ("ResBlock", "BasicTransformerBlock", "ResnetBlock", "AttnBlock")


def compile_mode(value, where: str = "model.compile") -> str | None:
    """``value`` (a config's bool or string) -> ``None`` (off), ``"whole"`` or ``"blocks"``; ``ValueError``
    naming ``where`` and the choices otherwise."""
    text = str(value).strip().lower() if value is not None else "false"
    if text not in CHOICES:
        raise ValueError(
            f"{where}={value}: not a compile mode; use one of {', '.join(CHOICES)} "
            "(true = whole: torch.compile the whole network; blocks: each repeated block)"
        )
    return {"false": None, "true": "whole"}.get(text, text)


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks ``blocks`` mode compiles: outermost modules whose class is one of ``REPEATED_BLOCKS``."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for sub in module.modules():
        if id(sub) in inside:
            continue
        if type(sub).__name__ in REPEATED_BLOCKS:
            found.append(sub)
            inside.update(id(m) for m in sub.modules())
    return found


def check_compiler(backend: str) -> None:
    """inductor on CPU builds C++ kernels: without a C++ compiler, say so before the first step fails."""
    if backend != "inductor" or torch.cuda.is_available():
        return
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(name and shutil.which(name) for name in candidates):
        raise ValueError(
            "model.compile: torch.compile's inductor backend needs a C++ compiler on CPU (g++ or clang++, or "
            "$CXX) and none is on PATH; install one (e.g. apt install g++) or set model.compile=false"
        )


def compile_in_place(module: nn.Module, mode: str | None, backend: str = "inductor") -> int:
    """Compile ``module`` as ``mode`` says (``compile_mode``'s result); returns the number of modules
    compiled (0: ``mode`` is None). ``backend``: torch.compile's (``inductor``; ``aot_eager`` captures the
    graphs without generating code: tests, debugging).

    Random ops inside a compiled graph (the VAE's posterior sample, dropout) draw from torch's own generator
    as in eager mode (inductor's ``fallback_random``), so a compiled run and an eager one, or a run resumed
    the other way, draw the same numbers. Shapes are static: each block shape and resolution gets its own
    graph (no symbolic shapes: simpler kernels, and no recompiles that generalise to dynamic shapes)."""
    if mode is None:
        return 0
    check_compiler(backend)
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    if mode == "whole":
        module.compile(backend=backend, dynamic=False)
        return 1
    if mode != "blocks":
        raise ValueError(f"compile mode {mode!r}: use whole or blocks")
    blocks = repeated_blocks(module)
    if not blocks:
        raise ValueError(
            f"compile=blocks: {type(module).__name__} has none of the repeated blocks "
            f"({', '.join(REPEATED_BLOCKS)}); use compile=whole"
        )
    # at most one graph per block (shape and resolution), in training and in inference (grad mode and the
    # train flag are guarded): beyond torch's default limit of 8, dynamo would run the rest eagerly
    wanted = 2 * len(blocks) + 4
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, wanted)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
