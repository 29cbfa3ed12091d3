"""Read a ``.safetensors`` file tensor by tensor with plain reads, converting each floating tensor to the
target dtype as it arrives.

Why not ``safetensors.torch.load_file``: it memory-maps the file, and every page it touches counts toward the
process's resident memory until the map closes, so loading an fp16 file into fp32 modules peaks at file size +
fp32 weights. Here the file's bytes are read into one scratch buffer, one tensor at a time, and converted
from there, so the peak is the converted weights plus the largest tensor of the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Collection

import torch

from ldm.io.file_checks import DamagedFileError, check_safetensors_file

__all__ = ["read_safetensors", "safetensors_header"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, ``{name: {"dtype", "shape", "data_offsets"}}``) of a checked file;
    the ``__metadata__`` entry is left out."""
    check_safetensors_file(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entries = json.loads(handle.read(length))
    entries.pop("__metadata__", None)
    return 8 + length, entries


def _read_exactly(handle, buffer: memoryview, path: str | os.PathLike) -> None:
    done = 0
    while done < len(buffer):
        count = handle.readinto(buffer[done:])
        if not count:
            raise DamagedFileError(
                f"{path}: the file ended while reading its tensors (truncated while loading?)"
            )
        done += count


def read_safetensors(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    keep_dtype: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, in file order; floating ones converted to ``dtype`` (None: as stored) except
    those named in ``keep_dtype``."""
    start, entries = safetensors_header(path)
    names = sorted(entries, key=lambda n: entries[n]["data_offsets"][0])
    for name in names:
        if entries[name]["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {entries[name]['dtype']}, which this reader does "
                f"not know ({', '.join(SAFETENSORS_DTYPES)}); convert the file to fp16/fp32"
            )

    def converts(name: str) -> bool:
        stored = SAFETENSORS_DTYPES[entries[name]["dtype"]]
        return dtype is not None and stored.is_floating_point and stored != dtype and name not in keep_dtype

    def size(name: str) -> int:
        begin, end = entries[name]["data_offsets"]
        return end - begin

    # one scratch buffer for every tensor that is converted: freed per-tensor buffers would leave holes in the
    # heap that the (larger) converted tensors cannot reuse
    scratch = torch.empty(max((size(n) for n in names if converts(n)), default=0), dtype=torch.uint8)
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as handle:
        for name in names:
            entry = entries[name]
            raw = scratch[: size(name)] if converts(name) else torch.empty(size(name), dtype=torch.uint8)
            handle.seek(start + entry["data_offsets"][0])
            _read_exactly(handle, memoryview(raw.numpy()).cast("B"), path)
            tensor = raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            state[name] = tensor.to(dtype) if converts(name) else tensor
    return state
