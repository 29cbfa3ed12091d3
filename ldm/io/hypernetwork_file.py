"""Hypernetwork files: AUTOMATIC1111's ``.pt`` layout, and a ``.safetensors`` form of the same content.

``.pt`` (what AUTOMATIC1111's webui saves and loads, ``modules/hypernetworks/hypernetwork.py``): one
``torch.save`` dict holding

* ``{width (int): (k_state_dict, v_state_dict)}`` for every covered K/V input width (SD v1: 768, SD v2: 1024;
  320/640/1280 apply to self-attention), each state dict keyed ``linear.<i>.weight`` / ``linear.<i>.bias``;
* ``layer_structure`` (list of multipliers), ``activation_func`` (str), ``is_layer_norm``,
  ``weight_initialization`` (``Normal``...), ``use_dropout``, ``dropout_structure`` (list),
  ``last_layer_dropout``, ``activate_output``, ``optional_info``, ``name``, ``step``, ``sd_checkpoint`` (the
  base's short hash), ``sd_checkpoint_name``;
* ours only: ``self_attention`` (False: cross-attention only; files without it follow AUTOMATIC1111, which
  applies every width everywhere it fits). AUTOMATIC1111 ignores keys it does not know.

We write it with plain types only (ints, floats, strings, lists, tuples, dicts of tensors), so it loads with
``torch.load(weights_only=True)``; reading goes through ``safe_torch_load`` and refuses any pickle that needs
more. Old files with ``linear1``/``linear2`` keys are renamed as AUTOMATIC1111 does.

``.safetensors``: tensors ``<width>.k.<key>`` / ``<width>.v.<key>`` (e.g. ``768.k.linear.0.weight``) and the
other fields as JSON strings in the metadata (``format: hypernetwork``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.io.safe_load import UnsafeCheckpointError, open_safetensors, safe_torch_load
from ldm.modules.adapters.hypernetwork import Hypernetwork, dropout_structure_for
from ldm.utils.files import atomic_write

__all__ = [
    "HypernetworkFile",
    "UnsafeCheckpointError",
    "load_hypernetwork",
    "read_hypernetwork",
    "save_hypernetwork",
]

_OLD_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}
_INFO_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "optional_info")


@dataclass
class HypernetworkFile:
    """What a hypernetwork file holds: per-width (key, value) MLP state dicts, the architecture and info."""

    weights: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]]
    layer_structure: list[float]
    activation_func: str = "linear"
    weight_initialization: str = "Normal"
    is_layer_norm: bool = False
    dropout_structure: list[float] = field(default_factory=list)
    activate_output: bool = False
    self_attention: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Hypernetwork:
        net = Hypernetwork(
            self.weights,
            self.layer_structure,
            self.activation_func,
            self.weight_initialization,
            self.is_layer_norm,
            self.dropout_structure,
            self.activate_output,
        )
        for width, (k_state, v_state) in self.weights.items():
            for mlp, state, which in zip(net.pair(width), (k_state, v_state), "kv"):
                try:
                    mlp.load_state_dict(state)
                except RuntimeError as err:
                    raise ValueError(
                        f"hypernetwork {self.info.get('name')!r}: the {which} MLP for width {width} "
                        f"does not match layer_structure {self.layer_structure}, activation "
                        f"{self.activation_func!r}, layer norm {self.is_layer_norm}, dropout "
                        f"{self.dropout_structure}: {err}"
                    ) from None
        return net


def _plain_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _file_fields(net: Hypernetwork, info: Mapping[str, Any], self_attention: bool) -> dict[str, Any]:
    o = net.options
    dropout = [float(p) for p in o["dropout_structure"]]
    return {
        "layer_structure": list(o["layer_structure"]),
        "activation_func": o["activation"],
        "is_layer_norm": bool(o["layer_norm"]),
        "weight_initialization": o["weight_init"],
        "use_dropout": any(p > 0 for p in dropout),
        "dropout_structure": dropout,
        "last_layer_dropout": len(dropout) >= 2 and dropout[-2] > 0,
        "activate_output": bool(o["activate_output"]),
        "self_attention": bool(self_attention),
        "name": str(info.get("name") or "hypernetwork"),
        "step": int(info.get("step") or 0),
        "sd_checkpoint": _str_or_none(info.get("sd_checkpoint")),
        "sd_checkpoint_name": _str_or_none(info.get("sd_checkpoint_name")),
        "optional_info": _str_or_none(info.get("optional_info")),
    }


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def save_hypernetwork(
    path: str | os.PathLike, net: Hypernetwork, *, self_attention: bool = False, **info: Any
) -> Path:
    """Write ``net`` as AUTOMATIC1111's ``.pt`` (or ``.safetensors`` by suffix), atomically. ``info``:
    ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``optional_info``."""
    path = Path(path)
    unknown = sorted(set(info) - set(_INFO_KEYS))
    if unknown:
        raise TypeError(f"save_hypernetwork: unknown info {unknown}; known: {list(_INFO_KEYS)}")
    if path.suffix not in (".pt", ".safetensors"):
        raise ValueError(f"hypernetwork file {str(path)!r}: use a .pt (AUTOMATIC1111) or .safetensors name")
    fields = _file_fields(net, info, self_attention)
    weights = {w: (_plain_state(k), _plain_state(v)) for w, (k, v) in ((w, net.pair(w)) for w in net.widths)}
    if path.suffix == ".pt":
        payload: dict[Any, Any] = {**weights, **fields}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    else:
        from safetensors.torch import save_file

        tensors = {
            f"{w}.{which}.{key}": t
            for w, pair in weights.items()
            for which, state in zip("kv", pair)
            for key, t in state.items()
        }
        metadata = {"format": "hypernetwork", **{k: json.dumps(v) for k, v in fields.items()}}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _read_pt(path: Path) -> tuple[dict[int, tuple[dict, dict]], dict[str, Any]]:
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping):
        raise ValueError(f"{str(path)!r} is not a hypernetwork file (it holds a {type(payload).__name__})")  # noqa: TRY004
    weights = {}
    for key, value in payload.items():
        if isinstance(key, int):
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"{str(path)!r}: entry {key} should be a (keys, values) pair of state dicts")
            weights[key] = tuple({_OLD_KEYS.get(k, k): t for k, t in state.items()} for state in value)
    return weights, {k: v for k, v in payload.items() if isinstance(k, str)}


def _read_safetensors(path: Path) -> tuple[dict[int, tuple[dict, dict]], dict[str, Any]]:
    with open_safetensors(path) as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != "hypernetwork":
            raise ValueError(
                f"{str(path)!r} is not a hypernetwork .safetensors (metadata format "
                f"{metadata.get('format')!r}, expected 'hypernetwork')"
            )
        weights: dict[int, tuple[dict, dict]] = {}
        for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
            width, which, key = name.split(".", 2)
            pair = weights.setdefault(int(width), ({}, {}))
            pair["kv".index(which)][key] = handle.get_tensor(name)
    return weights, {k: json.loads(v) for k, v in metadata.items() if k != "format"}


def read_hypernetwork(path: str | os.PathLike) -> HypernetworkFile:
    """Read ours or AUTOMATIC1111's file (``.pt`` weights-only, or ``.safetensors``); fields missing from old
    files take AUTOMATIC1111's load defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hypernetwork file {str(path)!r} does not exist")
    weights, fields = (_read_safetensors if path.suffix == ".safetensors" else _read_pt)(path)
    if not weights:
        raise ValueError(f"{str(path)!r} holds no hypernetwork layers (no integer width keys)")
    structure = [float(x) for x in fields.get("layer_structure") or [1, 2, 1]]
    dropout = fields.get("dropout_structure")
    if dropout is None:
        dropout = dropout_structure_for(
            structure, bool(fields.get("use_dropout", False)), bool(fields.get("last_layer_dropout", False))
        )
    info = {k: fields.get(k) for k in _INFO_KEYS}
    info["name"] = info["name"] or path.stem
    return HypernetworkFile(
        weights=weights,
        layer_structure=structure,
        activation_func=fields.get("activation_func") or "linear",
        weight_initialization=fields.get("weight_initialization") or "Normal",
        is_layer_norm=bool(fields.get("is_layer_norm", False)),
        dropout_structure=[float(p) for p in dropout],
        activate_output=bool(fields.get("activate_output", True)),
        self_attention=bool(fields.get("self_attention", True)),
        info=info,
    )


def load_hypernetwork(path: str | os.PathLike) -> tuple[Hypernetwork, HypernetworkFile]:
    """(the built hypernetwork in eval mode, what the file said)."""
    file = read_hypernetwork(path)
    return file.build().eval(), file
