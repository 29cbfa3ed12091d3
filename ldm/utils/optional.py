"""Optional packages: import one by name, or fail with one line that says which pip command installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingOptionalPackage(ImportError):
    """An optional package a chosen option needs is not installed (a user error: the message names the
    pip command)."""


def require(module: str, pip_name: str, needed_by: str, alternative: str = "") -> ModuleType:
    """``import module``, or raise :class:`MissingOptionalPackage` naming ``pip install <pip_name>``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        hint = f" (or {alternative})" if alternative else ""
        raise MissingOptionalPackage(
            f"{needed_by} needs the package {pip_name}: `pip install {pip_name}`{hint}"
        ) from error
