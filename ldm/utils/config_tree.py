"""Print the composed config as a rich tree and save it beside the run."""

from __future__ import annotations

from pathlib import Path

import rich
import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.utils.files import atomic_write

_ORDER = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None, resolve: bool = False) -> None:
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    fields = [f for f in _ORDER if f in cfg] + [f for f in cfg if f not in _ORDER]
    for field in fields:
        branch = tree.add(field, style="bold", guide_style="dim")
        node = cfg[field]
        text = OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        atomic_write(save_to, lambda tmp: _print_to(tree, tmp))


def _print_to(tree: rich.tree.Tree, path: str) -> None:
    with open(path, "w") as f:
        rich.print(tree, file=f)
