"""Run a task (``train``, a script's ``main``) so that a user's mistake reads as one actionable line, not a
traceback.

Pattern of lightning-hydra-template's ``task_wrapper``: the task runs inside ``run_task``; an error a user
causes and can fix (a path that does not exist, a missing or wrong config value, a checkpoint of another
architecture, a GPU trainer on a machine without one) is logged once as ``error: <what>. <hint>`` and the
process exits with status 1; ``HYDRA_FULL_ERROR=1`` re-raises it with the full traceback. Anything else (a
bug) keeps its traceback. wandb is closed in ``finally`` so a failed run does not hang on its uploader.
``run_main`` does the same for the command-line scripts (``sample.py``, ``scripts/convert.py``, the
benchmarks), printing the line on stderr: ``if __name__ == "__main__": run_main(main)``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")  # no heavy import at module level: benchmarks measuring memory import run_main

# Config keys that moved: Hydra's own message for the old one ("Could not override ... Key ... is not in
# struct") does not say where the value lives now.
RENAMED_KEYS = {"model.method.prior_loss_weight": "model.prior_loss_weight"}

NO_GPU_HINT = (
    "this machine has no usable GPU: use trainer=cpu (one process) or trainer=ddp_sim "
    "(DDP with 2 CPU processes)"
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    from ldm.utils.files import DiskFullError
    from ldm.utils.optional import MissingOptionalPackage

    return (
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        IsADirectoryError,
        ValueError,
        DiskFullError,
        MissingOptionalPackage,
        MisconfigurationException,
        OmegaConfBaseException,
    )


def root_cause(error: BaseException) -> BaseException:
    """The error under Hydra's ``InstantiationException`` wrappers ("Error in call to target ...")."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def is_user_error(error: BaseException) -> bool:
    return isinstance(root_cause(error), _user_error_types())


def hint_for(error: BaseException) -> str:
    """A fix for errors whose own message does not say what to do."""
    text = str(error).lower()
    if "gpu" in text or "cuda" in text:
        import torch

        if not torch.cuda.is_available():
            return NO_GPU_HINT
    return ""


def renamed_override(args: list[str]) -> str | None:
    """``error: ...`` for the first command-line override that names a key in ``RENAMED_KEYS``, else None."""
    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key in RENAMED_KEYS:
            return (
                f"error: {key} was renamed: use {RENAMED_KEYS[key]}"
                f"{'=' + arg.split('=', 1)[1] if '=' in arg else ''} (one weight for every fine-tuning "
                "method)"
            )
    return None


def built_at(error: BaseException) -> str | None:
    """The config key Hydra was instantiating when ``error`` happened (its ``full_key: data.source``)."""
    match = re.search(r"full_key: (\S+)", str(error))
    return match.group(1) if match else None


def one_line(error: BaseException) -> str:
    """``error: <message> (<hint>)`` on one line; the full trace is one environment variable away."""
    cause = root_cause(error)
    message = " ".join(str(cause).split()) or type(cause).__name__
    key = built_at(error)
    if key and key.startswith("data.") and "data.root" in message:  # a nested datamodule: data.source.root
        message = message.replace("data.root", f"{key}.root")
    hint = hint_for(cause)
    return f"error: {message}" + (f" -> {hint}" if hint else "") + " (HYDRA_FULL_ERROR=1 for the full trace)"


def close_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def full_trace_asked() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def child_failure(what: str, stderr: str) -> SystemExit:
    """The exit of a script whose child process (one benchmark variant) failed: the child's own ``error:``
    line when it printed one (a user error, already one line), else the tail of its stderr (a bug)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if errors:
        print(f"error: {what}: {errors[-1].removeprefix('error: ')}", file=sys.stderr)
        return SystemExit(1)
    return SystemExit(f"{what} failed:\n{stderr[-3000:]}")


def run_main(main: Callable[..., T], *args, **kwargs) -> T:
    """A script's ``main(*args, **kwargs)``; a user error -> ``error: ...`` on stderr and exit status 1 (see
    the module docstring; ``HYDRA_FULL_ERROR=1`` keeps the traceback)."""
    try:
        return main(*args, **kwargs)
    except Exception as error:
        if not is_user_error(error) or full_trace_asked():
            raise
        print(one_line(error), file=sys.stderr)
        raise SystemExit(1) from None


def run_task(task: Callable[..., T], *args, **kwargs) -> T:
    """``task(*args, **kwargs)``; a user error -> one logged line and exit status 1 (see module docstring)."""
    try:
        return task(*args, **kwargs)
    except Exception as error:
        if not is_user_error(error) or full_trace_asked():
            raise
        from ldm.utils.logging import get_logger

        get_logger(__name__).error(one_line(error))
        raise SystemExit(1) from None
    finally:
        close_wandb()
