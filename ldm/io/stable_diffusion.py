"""Stable Diffusion single-file checkpoints (``.safetensors`` / ``.ckpt``): presets, load, export.

The original LDM layout of a Stable Diffusion file::

    model.diffusion_model.*                      UNet           -> ldm.modules.unet.UNetModel (same names)
    first_stage_model.*                          VAE (kl-f8)    -> ldm.modules.vae.AutoencoderKL (same names)
    cond_stage_model.transformer.text_model.*    SD v1 CLIP     -> CLIPTextEncoder.transformer.text_model.*
    cond_stage_model.model.*                     SD v2 OpenCLIP -> converted to the HF CLIP layout (23 layers)
    model_ema.<name without dots>                EMA UNet (``model_ema.diffusion_modelinput_blocks00weight``)
    betas, alphas_cumprod, ...                   schedule buffers (used when they differ from the preset)

Loading is strict: every tensor of the UNet, VAE and text encoder must be in the file with the right shape,
and a key outside the known groups stops the load; errors name the first mismatched keys and shapes.
``.ckpt`` files are read with ``torch.load(weights_only=True)`` only (plus numpy scalars and an inert stand-in
for the Lightning ``ModelCheckpoint`` callback state that old SD files carry); anything else is refused,
because unpickling an untrusted file can run arbitrary code.

Our exports add ``ldm.config`` metadata (the architecture of every part), so any model we write, tiny or
full size, loads back without presets; small custom tokenizers are embedded as ``ldm.tokenizer/<file>``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTokenizer

from ldm.diffusion import DiffusionSchedule
from ldm.modules.attention import SpatialTransformer
from ldm.modules.text_encoder import PRESETS as TEXT_PRESETS
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.unet import Downsample, ResBlock, UNetModel
from ldm.modules.vae import AutoencoderKL
from ldm.utils.logging import get_logger

log = get_logger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # + text_model.*  (SD v1)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD v2
EMA_PREFIX = "model_ema."
STANDARD_CLIP_VOCAB = 49408
CONFIG_METADATA_KEY = "ldm.config"
TOKENIZER_METADATA_PREFIX = "ldm.tokenizer/"

# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attention_resolutions": [4, 2, 1],
    "transformer_depth": 1,
    "use_checkpoint": False,
    "dropout": 0.0,
    "use_scale_shift_norm": False,
}
_SD_VAE = {
    "embed_dim": 4,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "resolution": 256,
    "norm_groups": 32,
}
_SD_SCHEDULE = {"kind": "scaled_linear", "num_timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}

# Architecture + diffusion settings of the released models. "text_encoder" is a CLIPTextConfig dict.
PRESETS: dict[str, dict[str, Any]] = {
    # SD v1.x (1.1-1.5): CLIP ViT-L/14 last hidden state, 8 heads, 1x1-conv proj, eps, 512 px.
    "v1": {
        "version": "v1",
        "unet": {
            **_SD_UNET,
            "num_heads": 8,
            "num_head_channels": -1,
            "context_dim": 768,
            "use_linear_in_transformer": False,
        },
        "vae": _SD_VAE,
        "text_encoder": TEXT_PRESETS["vit_l_14"],
        "schedule": _SD_SCHEDULE,
        "parameterization": "eps",
        "scale_factor": 0.18215,
        "resolution": 512,
    },
    # SD 2.x 512-base: OpenCLIP ViT-H/14 penultimate layer (23-layer HF layout), 64-wide heads, linear proj.
    "v2": {
        "version": "v2",
        "unet": {
            **_SD_UNET,
            "num_heads": -1,
            "num_head_channels": 64,
            "context_dim": 1024,
            "use_linear_in_transformer": True,
        },
        "vae": _SD_VAE,
        "text_encoder": TEXT_PRESETS["vit_h_14"],
        "schedule": _SD_SCHEDULE,
        "parameterization": "eps",
        "scale_factor": 0.18215,
        "resolution": 512,
    },
}
# SD 2.x 768-v (2.0-v, 2.1): same weights layout, v-prediction at 768 px.
PRESETS["v2-v"] = {**PRESETS["v2"], "parameterization": "v", "resolution": 768}

# Where the tokenizer of a single file comes from when none is given (hub cache or download).
DEFAULT_TOKENIZERS = {
    "v1": ("openai/clip-vit-large-patch14", ""),
    "v2": ("stabilityai/stable-diffusion-2-1", "tokenizer"),
}

_TEXT_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "projection_dim",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclasses.dataclass
class SDComponents:
    """The parts of a text-to-image latent diffusion model, ready to use or fine-tune.

    All modules are in eval mode; the UNet's parameters require grad, the VAE's and the text encoder's
    do not. ``version``: ``"v1"``, ``"v2"`` or ``"custom"`` (any other architecture, e.g. our own models).
    ``resolution``: the native image size (512 for v1 / v2-base, 768 for v2-v).
    """

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    schedule: DiffusionSchedule
    parameterization: str
    scale_factor: float
    version: str
    resolution: int = 512

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


def resolve_preset(preset: str | Mapping | None = None, **overrides: Any) -> dict[str, Any]:
    """A preset (name or dict) with ``overrides`` applied: ``unet``/``vae``/``text_encoder``/``schedule``
    dicts update the preset's dicts key by key; scalars (parameterization, scale_factor, resolution)
    replace."""
    if preset is None:
        base: dict[str, Any] = copy.deepcopy(PRESETS["v1"])
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown Stable Diffusion preset {preset!r}; choose from {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[preset])
    else:
        base = copy.deepcopy(dict(preset))
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("unet", "vae", "text_encoder", "schedule"):
            if isinstance(value, str) and key == "text_encoder":
                value = TEXT_PRESETS[value]
            base[key] = {**base.get(key, {}), **_plain(value)}
        elif key in ("parameterization", "scale_factor", "resolution", "version"):
            base[key] = value
        else:
            raise TypeError(f"unknown preset override {key!r}")
    return base


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra overrides) -> plain dicts/lists."""
    if hasattr(value, "_metadata") and hasattr(value, "_content"):  # omegaconf DictConfig / ListConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value


def as_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``torch.float16`` | ``"fp16"`` | ``"float16"`` | ``"bf16"`` | ... -> torch.dtype (None -> default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower().removeprefix("torch."))
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ValueError(f"not a floating point dtype: {dtype!r}")
    return result


# ----------------------------------------------------------------------------------------------------------
# Reading files safely
# ----------------------------------------------------------------------------------------------------------


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that needs more than plain tensors and containers to load."""


class _InertPickledObject:
    """Stands in for known-harmless pickled objects (Lightning callback state); never runs their code."""


def _safe_pickle_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
        (_InertPickledObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_InertPickledObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    ]


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers, numbers, strings only (plus numpy scalars
    and inert stand-ins for Lightning callback state). Anything else raises ``UnsafeCheckpointError``."""
    try:
        with torch.serialization.safe_globals(_safe_pickle_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # legacy (pre-zipfile) pickles cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to improve the message
            needed = []
        details = ", ".join(needed) or re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()[-1][:300]
        raise UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it is a pickle that needs Python objects beyond tensors "
            f"({details}), and unpickling an untrusted file can run arbitrary code. Convert it to "
            ".safetensors with a tool you trust, or use a .safetensors / diffusers version of the model."
        ) from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) of a ``.safetensors`` file or a weights-only ``.ckpt``/``.pt``/``.bin``.
    A Lightning-style ``{"state_dict": {...}}`` wrapper is removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    payload = safe_torch_load(path)
    return unwrap_state_dict(payload, str(path)), {}


def unwrap_state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    while isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping):
        kind = type(payload).__name__
        raise ValueError(f"{source} does not hold a state dict (got {kind})")  # noqa: TRY004
    state = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{source} holds no tensors")
    return state


# ----------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 5
) -> str:
    """'' when ``given`` has exactly the keys and shapes of ``expected``; else a readable description."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if wrong:
        parts.append(
            f"{len(wrong)} with a different shape (file vs model), e.g. "
            + ", ".join(f"{k} {_shape(given[k])} vs {_shape(expected[k])}" for k in wrong[:limit])
        )
    if missing:
        parts.append(
            f"{len(missing)} missing from the file, e.g. "
            + ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:limit])
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} not in the model, e.g. "
            + ", ".join(f"{k} {_shape(given[k])}" for k in unexpected[:limit])
        )
    return "; ".join(parts)


def load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str, hint: str = ""
) -> nn.Module:
    """Load ``state`` into ``module`` (built on the meta device or not) only if keys and shapes match
    exactly; otherwise ``ValueError`` naming the first mismatched keys and shapes."""
    problems = state_dict_mismatches(module.state_dict(), state)
    if problems:
        raise ValueError(
            f"{source}: the {what} weights do not match the {what} architecture: {problems}."
            + (f" {hint}" if hint else "")
        )
    module.load_state_dict(dict(state), strict=True, assign=True)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"{what}: tensors left unset after loading: {still_meta[:5]}")
    return module


def _on_meta(factory):
    with torch.device("meta"):
        return factory()


# ----------------------------------------------------------------------------------------------------------
# Describing modules (the config that rebuilds them), used in export metadata
# ----------------------------------------------------------------------------------------------------------


def describe_unet(unet: UNetModel) -> dict[str, Any]:
    """``UNetModel(**describe_unet(unet))`` rebuilds the architecture of ``unet``."""
    widths, per_level, attention = [], [0], set()
    transformers: list[SpatialTransformer] = []
    ds = 1
    for block in list(unet.input_blocks)[1:]:
        if isinstance(block[0], Downsample):
            per_level.append(0)
            ds *= 2
            continue
        if not isinstance(block[0], ResBlock):
            raise TypeError(f"unexpected input block {type(block[0]).__name__}")
        if per_level[-1] == 0:
            widths.append(block[0].out_layers[3].out_channels)
        per_level[-1] += 1
        if len(block) > 1:
            attention.add(ds)
            transformers.append(block[1])
    transformers.append(unet.middle_block[1])
    if len(set(per_level)) != 1:
        raise ValueError(f"uneven res blocks per level {per_level}")
    blocks = [b for t in transformers for b in t.transformer_blocks]
    heads = {b.attn1.heads for b in blocks}
    dims = {b.attn1.dim_head for b in blocks}
    if len(heads) == 1:
        num_heads, num_head_channels = heads.pop(), -1
    elif len(dims) == 1:
        num_heads, num_head_channels = -1, dims.pop()
    else:
        raise ValueError("attention heads vary in both count and width; no UNetModel config describes that")
    first = unet.input_blocks[1][0]
    return {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "channel_mult": [w // unet.model_channels for w in widths],
        "num_res_blocks": per_level[0],
        "attention_resolutions": sorted(attention, reverse=True),
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "transformer_depth": len(transformers[0].transformer_blocks),
        "context_dim": unet.context_dim,
        "use_linear_in_transformer": bool(transformers[0].use_linear),
        "use_checkpoint": False,
        "dropout": float(first.out_layers[2].p),
        "use_scale_shift_norm": bool(first.use_scale_shift_norm),
    }


def describe_vae(vae: AutoencoderKL) -> dict[str, Any]:
    """``AutoencoderKL(**describe_vae(vae))`` rebuilds the architecture of ``vae`` (at resolution 256)."""
    encoder = vae.encoder
    ch = encoder.conv_in.out_channels
    groups = max(m.num_groups for m in vae.modules() if isinstance(m, nn.GroupNorm))
    return {
        "embed_dim": vae.embed_dim,
        "ch": ch,
        "ch_mult": [level.block[-1].conv2.out_channels // ch for level in encoder.down],
        "num_res_blocks": len(encoder.down[0].block),
        "in_channels": encoder.conv_in.in_channels,
        "out_ch": vae.decoder.conv_out.out_channels,
        "z_channels": vae.post_quant_conv.out_channels,
        "attn_resolutions": [256 // 2**i for i, level in enumerate(encoder.down) if len(level.attn)],
        "resolution": 256,
        "dropout": float(encoder.down[0].block[0].dropout.p),
        "norm_groups": groups,
    }


def describe_text_encoder(text_encoder: CLIPTextEncoder) -> dict[str, Any]:
    """CLIPTextConfig fields of the text tower plus the encoder options (max_length, layer, ...)."""
    config = text_encoder.transformer.config
    described = {name: getattr(config, name) for name in _TEXT_CONFIG_FIELDS}
    described.update(
        max_length=text_encoder.max_length,
        layer=text_encoder.layer,
        final_layer_norm=text_encoder.final_layer_norm,
    )
    return described


def describe_schedule(schedule: DiffusionSchedule) -> dict[str, Any]:
    """A ``DiffusionSchedule.from_config`` dict when ``schedule`` is a standard one, else its betas."""
    for kind in ("scaled_linear", "linear"):
        config = {**_SD_SCHEDULE, "kind": kind, "num_timesteps": schedule.num_timesteps}
        if torch.allclose(
            DiffusionSchedule.from_config(**config).betas, schedule.betas, rtol=1e-6, atol=1e-9
        ):
            return config
    return {"betas": [float(b) for b in schedule.betas]}


def build_schedule(config: Mapping[str, Any]) -> DiffusionSchedule:
    config = dict(config)
    if "betas" in config:
        return DiffusionSchedule(torch.tensor(config["betas"], dtype=torch.float64))
    return DiffusionSchedule.from_config(**config)


def version_of(unet_config: Mapping[str, Any], text_config: Mapping[str, Any] | None = None) -> str:
    """``"v1"``/``"v2"`` when the architecture is that of the released models, else ``"custom"``."""
    keys = set(PRESETS["v1"]["unet"]) - {"use_checkpoint", "dropout"}
    for version in ("v1", "v2"):
        preset = PRESETS[version]
        config = {
            **unet_config,
            "attention_resolutions": sorted(unet_config.get("attention_resolutions", ()), reverse=True),
        }
        if all(_same(config.get(k), preset["unet"][k]) for k in keys) and (
            text_config is None
            or int(text_config.get("hidden_size", 0)) == preset["text_encoder"]["hidden_size"]
        ):
            return version
    return "custom"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and list(a) == list(b)
    return a == b


# ----------------------------------------------------------------------------------------------------------
# Text encoder layouts
# ----------------------------------------------------------------------------------------------------------

_OPENCLIP_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_IGNORED = ("text_projection", "logit_scale", "attn_mask")


def openclip_to_hf(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (``cond_stage_model.model.*`` without the prefix) -> HF ``text_model.*``.

    ``in_proj_weight`` [3C, C] splits into q/k/v. SD 2.x conditions on the penultimate of 24 layers, so with
    ``num_layers=23`` (the diffusers layout) the last block is dropped; ``ln_final`` becomes
    ``final_layer_norm`` (SD2 applies it to the penultimate output). Unknown keys are kept, unrenamed, so the
    strict check reports them.
    """
    blocks = {int(m[1]) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    drop_last = len(blocks) == num_layers + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _OPENCLIP_IGNORED:
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key):
            index, name, param = int(m[1]), m[2], m[3]
            if drop_last and index == num_layers:
                continue
            out[f"text_model.encoder.layers.{index}.{_OPENCLIP_TO_HF.get(name, name)}.{param}"] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            index, param = int(m[1]), m[2]
            if drop_last and index == num_layers:
                continue
            layer = f"text_model.encoder.layers.{index}.self_attn."
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{layer}{part}_proj.{param}"] = chunk
        else:
            out[key] = value
    return out


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``openclip_to_hf`` (keys without ``cond_stage_model.model.``); q/k/v fuse into in_proj."""
    hf_to_oc = {v: k for k, v in _OPENCLIP_TO_HF.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            index, name, param = m[1], m[2], m[3]
            if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", name):
                fused.setdefault(f"transformer.resblocks.{index}.attn.in_proj_{param}", {})[qkv[1]] = value
            else:
                out[f"transformer.resblocks.{index}.{hf_to_oc[name]}.{param}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def _tokenizer_cache_dir() -> Path:
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "ldm-cache")
    return Path(root) / "sd-tokenizers"


def tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """The tokenizer's files (``tokenizer.json``, ``vocab.json``, ``merges.txt``, configs) as text."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not os.path.isfile(os.path.join(tmp, "vocab.json")) and hasattr(
            getattr(backend, "model", None), "save"
        ):
            backend.model.save(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _tokenizer_from_files(files: Mapping[str, str]) -> CLIPTokenizer:
    digest = hashlib.sha256(json.dumps(dict(sorted(files.items()))).encode()).hexdigest()[:16]
    folder = _tokenizer_cache_dir() / digest
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if Path(name).name != name:
            raise ValueError(f"bad embedded tokenizer file name {name!r}")
        target = folder / name
        if not (target.is_file() and target.read_text(encoding="utf-8") == text):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, target)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _check_tokenizer(tokenizer: Any, vocab_size: int, source: str) -> Any:
    # transformers 5 returns an EMPTY tokenizer (2 tokens) instead of failing when the files are missing.
    if len(tokenizer) < min(vocab_size, 256 + 2):
        raise OSError(
            f"the tokenizer from {source} has only {len(tokenizer)} tokens (vocabulary files missing?)"
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens but the text encoder only "
            f"{vocab_size} embeddings"
        )
    return tokenizer


def resolve_tokenizer(
    tokenizer: Any, version: str, metadata: Mapping[str, str], vocab_size: int, max_length: int
) -> CLIPTokenizer | None:
    """The tokenizer for a single file: ``tokenizer`` (an instance or a folder), else one embedded in the
    metadata, else the released one from the Hugging Face cache (or hub when online). None when none is found
    (a warning says how to pass one)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        folder = Path(tokenizer).expanduser()
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(tokenizer)!r} does not exist")
        loaded = CLIPTokenizer.from_pretrained(
            str(folder), model_max_length=max_length, local_files_only=True
        )
        return _check_tokenizer(loaded, vocab_size, str(folder))
    embedded = {
        k[len(TOKENIZER_METADATA_PREFIX) :]: v
        for k, v in metadata.items()
        if k.startswith(TOKENIZER_METADATA_PREFIX)
    }
    if embedded:
        return _check_tokenizer(_tokenizer_from_files(embedded), vocab_size, "the file's metadata")
    if version in DEFAULT_TOKENIZERS and vocab_size == STANDARD_CLIP_VOCAB:
        repo, subfolder = DEFAULT_TOKENIZERS[version]
        try:
            loaded = CLIPTokenizer.from_pretrained(
                repo, subfolder=subfolder, model_max_length=max_length, local_files_only=_hub_offline()
            )
            return _check_tokenizer(loaded, vocab_size, repo)
        except Exception as err:  # noqa: BLE001 - any failure means "not available here"
            reason = f"{repo} is not available ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    else:
        reason = "the file embeds none and its vocabulary is not the released CLIP one"
    log.warning(
        f"no tokenizer for this checkpoint: {reason}. Pass tokenizer=<folder with vocab.json and "
        "merges.txt> (e.g. the tokenizer/ folder of a diffusers Stable Diffusion model); without one "
        "only token ids can be encoded."
    )
    return None


def _hub_offline() -> bool:
    return any(
        os.environ.get(n, "").strip().lower() in {"1", "on", "yes", "true"}
        for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# ----------------------------------------------------------------------------------------------------------
# Loading a single file
# ----------------------------------------------------------------------------------------------------------

_SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
    "v_pred",
    "ztsnr",
}


def ema_key(unet_key: str) -> str:
    """LitEma's name of UNet parameter ``unet_key``: ``model_ema.`` + ``diffusion_model.<key>`` sans dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_single_file(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group a single-file state dict: ``unet``, ``ema`` (raw ``model_ema.*`` names), ``vae``, ``clip``
    (``text_model.*``), ``openclip`` (OpenCLIP names), ``extra`` (schedule buffers). Unknown keys raise."""
    groups: dict[str, dict[str, torch.Tensor]] = {
        g: {} for g in ("unet", "ema", "vae", "clip", "openclip", "extra")
    }
    unknown = []
    for key, value in state.items():
        if key in _SCHEDULE_BUFFERS:
            groups["extra"][key] = value
        elif key.startswith(UNET_PREFIX):
            groups["unet"][key[len(UNET_PREFIX) :]] = value
        elif key.startswith(EMA_PREFIX):
            groups["ema"][key] = value
        elif key.startswith(VAE_PREFIX + "loss."):
            continue  # the VAE training loss (LPIPS, discriminator) of unpruned files
        elif key.startswith(VAE_PREFIX):
            groups["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(CLIP_PREFIX):
            name = key[len(CLIP_PREFIX) :]
            if not name.startswith("text_model."):  # transformers < 4.? wrote no text_model level
                name = "text_model." + name
            if not name.endswith("position_ids"):
                groups["clip"][name] = value
        elif key.startswith(OPENCLIP_PREFIX):
            groups["openclip"][key[len(OPENCLIP_PREFIX) :]] = value
        else:
            unknown.append(key)
    if unknown:
        what = (
            "an SDXL checkpoint (not supported)"
            if any(k.startswith("conditioner.") for k in unknown)
            else "not a Stable Diffusion v1/v2 single file"
        )
        raise ValueError(
            f"{source}: {len(unknown)} keys outside the Stable Diffusion layout ({what}), e.g. "
            + ", ".join(f"{k} {_shape(state[k])}" for k in unknown[:5])
        )
    if not groups["unet"] and not groups["ema"]:
        prefixes = sorted({k.split(".")[0] for k in state})[:10]
        raise ValueError(
            f"{source}: no model.diffusion_model.* keys, so not a Stable Diffusion checkpoint "
            f"(top-level names: {prefixes})"
        )
    return groups


def detect_version(state: Mapping[str, torch.Tensor]) -> str:
    """``"v1"`` or ``"v2"`` from the keys (OpenCLIP text tower, linear proj_in, 1024-wide context)."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        return "v2"
    to_k = state.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = state.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    if (to_k is not None and to_k.shape[-1] == 1024) or (proj_in is not None and proj_in.ndim == 2):
        return "v2"
    return "v1"


def _guess_v2_parameterization(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
) -> str:
    """eps (512-base) and v (768-v) SD2 files have the same tensors: use markers, else the file name."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v"
    if spec in ("epsilon", "eps"):
        return "eps"
    if "v_pred" in state:
        return "v"
    name = Path(source).name.lower()
    if re.search(r"768|v[-_]?pred", name):
        return "v"
    if re.search(r"512|base|eps", name):
        return "eps"
    log.warning(
        f"{source}: SD 2.x 512-base (eps) and 768-v (v-prediction) files cannot be told apart from "
        "their weights; assuming v-prediction at 768 px. Pass preset='v2' (or parameterization='eps') "
        "for a 512-base model."
    )
    return "v"


def load_single_file(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    *,
    preset: str | Mapping | None = None,
    unet: Mapping | None = None,
    vae: Mapping | None = None,
    text_encoder: str | Mapping | None = None,
    schedule: Mapping | None = None,
    parameterization: str | None = None,
    scale_factor: float | None = None,
    resolution: int | None = None,
    tokenizer: Any = None,
    metadata: Mapping[str, str] | None = None,
    name: str | None = None,
) -> SDComponents:
    """Components of a Stable Diffusion single file (path or an already read state dict).

    Architecture, in order of precedence: the keyword overrides (``unet``, ``vae``, ``text_encoder``,
    ``schedule`` dicts update the preset), ``preset`` (``"v1"``; ``"v2"`` = 2.x 512-base; ``"v2-v"`` =
    2.x 768-v), the file's own ``ldm.config`` metadata (our exports), else the preset detected from the
    keys. ``use_ema`` takes the ``model_ema.*`` UNet weights when the file has them. ``dtype``: default
    float32. ``tokenizer``: a ``CLIPTokenizer`` or a folder; default: embedded in the file, else the
    released one from the Hugging Face cache. ``metadata``/``name``: for an already read state dict, its
    file's metadata and name (for messages). Any mismatch raises ``ValueError`` naming keys and shapes.
    """
    if isinstance(source, Mapping):
        name = name or "<state dict>"
        state, metadata = unwrap_state_dict(source, name), dict(metadata or {})
    else:
        name = name or str(source)
        state, file_metadata = read_checkpoint(source)
        metadata = {**file_metadata, **(metadata or {})}
    groups = split_single_file(state, name)
    detected = detect_version(state)
    overrides = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "schedule": schedule,
        "parameterization": parameterization,
        "scale_factor": scale_factor,
        "resolution": resolution,
    }
    if preset is not None:
        config = resolve_preset(preset, **overrides)
        origin = f"preset {preset!r}" if isinstance(preset, str) else "the given preset"
    elif CONFIG_METADATA_KEY in metadata:
        config = resolve_preset(json.loads(metadata[CONFIG_METADATA_KEY]), **overrides)
        origin = "the file's ldm.config metadata"
    else:
        base = detected
        if detected == "v2":
            guess = parameterization or _guess_v2_parameterization(state, metadata, name)
            base = "v2-v" if guess == "v" else "v2"
        config = resolve_preset(base, **overrides)
        origin = f"preset {base!r} (detected from the keys)"
    if any(v is not None for v in (unet, vae, text_encoder)):
        origin += " with overrides"
    hint = (
        f"The architecture came from {origin}; the keys look like SD {detected}. Pick the matching "
        f"preset ({', '.join(sorted(PRESETS))}) or override unet=/vae=/text_encoder=."
    )
    text_config = {k: v for k, v in config["text_encoder"].items() if k in _TEXT_CONFIG_FIELDS}
    text_options = {
        k: config["text_encoder"][k]
        for k in ("max_length", "layer", "final_layer_norm")
        if k in config["text_encoder"]
    }
    version = version_of(config["unet"], text_config)

    # UNet (optionally the EMA copy)
    unet_module = _on_meta(lambda: UNetModel(**config["unet"]))
    unet_state = groups["unet"]
    ema_weights = {k: v for k, v in groups["ema"].items() if k not in _SCHEDULE_BUFFERS}
    if use_ema and ema_weights:
        lookup = {ema_key(k): k for k in unet_module.state_dict()}
        unet_state = {lookup.get(k, k): v for k, v in ema_weights.items()}
        log.info(f"{name}: using the EMA UNet weights (model_ema.*)")
    elif use_ema:
        log.info(
            f"{name}: no model_ema.* weights; using model.diffusion_model.* (in '-emaonly' files these are "
            "the EMA weights)"
        )
    load_strict(unet_module, unet_state, "UNet (EMA)" if use_ema and ema_weights else "UNet", name, hint)

    vae_state = dict(groups["vae"])
    for key, value in vae_state.items():  # some converted files store the VAE attention as Linear [C, C]
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            vae_state[key] = value[:, :, None, None]
    vae_module = load_strict(_on_meta(lambda: AutoencoderKL(**config["vae"])), vae_state, "VAE", name, hint)

    if groups["openclip"]:
        clip_state = openclip_to_hf(groups["openclip"], int(text_config["num_hidden_layers"]))
    else:
        clip_state = groups["clip"]
    text_module = CLIPTextEncoder.from_config(dict(text_config), device="meta", **text_options)
    load_strict(text_module.transformer, clip_state, "text encoder", name, hint)
    text_module.tokenizer = resolve_tokenizer(
        tokenizer, version, metadata, int(text_config["vocab_size"]), text_module.max_length
    )

    sched = build_schedule(config["schedule"])
    betas = groups["extra"].get("betas")
    if schedule is None and betas is not None:
        file_betas = betas.double().flatten()
        if file_betas.shape != sched.betas.shape or not torch.allclose(file_betas, sched.betas, rtol=1e-4):
            log.info(f"{name}: using the file's own beta schedule ({len(file_betas)} steps)")
            sched = DiffusionSchedule(file_betas)

    components = SDComponents(
        unet=unet_module,
        vae=vae_module,
        text_encoder=text_module,
        schedule=sched,
        parameterization=config["parameterization"],
        scale_factor=float(config["scale_factor"]),
        version=version,
        resolution=int(config["resolution"]),
    )
    return finalize(components, dtype)


def finalize(components: SDComponents, dtype: torch.dtype | str | None) -> SDComponents:
    """Cast to ``dtype`` (default float32), eval mode, UNet trainable, VAE and text encoder frozen."""
    target = as_dtype(dtype)
    components.unet.to(dtype=target).eval().requires_grad_(True)
    components.vae.to(dtype=target).eval().requires_grad_(False)
    components.text_encoder.to(dtype=target)
    if hasattr(components.text_encoder, "freeze"):
        components.text_encoder.freeze()
    else:
        components.text_encoder.eval().requires_grad_(False)
    if hasattr(components.text_encoder, "clear_cache"):
        components.text_encoder.clear_cache()
    return components


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def _check_exportable(module: nn.Module, config: Mapping[str, Any], factory, what: str) -> dict:
    state = module.state_dict()
    problems = state_dict_mismatches(_on_meta(lambda: factory(**config)).state_dict(), state)
    if problems:
        raise ValueError(
            f"cannot export the {what}: its weights are not those of a plain {factory.__name__} "
            f"({problems}). Merge adapters (LoRA, ...) into the weights before exporting."
        )
    return state


def _tensor_for_file(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def export_single_file(
    path: str | os.PathLike,
    unet: UNetModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextEncoder,
    *,
    schedule: DiffusionSchedule | None = None,
    parameterization: str = "eps",
    scale_factor: float = 0.18215,
    resolution: int | None = None,
    version: str | None = None,
    dtype: torch.dtype | str = torch.float16,
    metadata: Mapping[str, Any] | None = None,
    embed_tokenizer: bool | None = None,
) -> Path:
    """Write a Stable Diffusion single ``.safetensors`` file (original LDM layout).

    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and the text encoder as
    ``cond_stage_model.transformer.text_model.*`` (SD v1 CLIP layout) or, with ``version="v2"`` (the
    default when the text encoder is 1024 wide), ``cond_stage_model.model.*`` (OpenCLIP layout, 23 blocks).
    Floating tensors are cast to ``dtype`` (default fp16). The schedule's ``betas``/``alphas_cumprod`` are
    stored as in the released files; ``v_pred`` marks v-prediction. Metadata: ``ldm.config`` (the
    architecture, so the file loads back without presets), ``modelspec.*``, the small custom tokenizer when
    ``embed_tokenizer`` (default: only when its vocabulary is not the released CLIP one), and ``metadata``
    (non-strings JSON-encoded).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export writes .safetensors files (safe to load anywhere); got {str(path)!r}")
    target = as_dtype(dtype)
    unet_config, vae_config = describe_unet(unet), describe_vae(vae)
    text_config = describe_text_encoder(text_encoder)
    if version is None:
        version = "v2" if text_config["hidden_size"] == 1024 else "v1"
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2' (the text encoder layout), got {version!r}")

    tensors: dict[str, torch.Tensor] = {}
    for key, value in _check_exportable(unet, unet_config, UNetModel, "UNet").items():
        tensors[UNET_PREFIX + key] = value
    for key, value in _check_exportable(vae, vae_config, AutoencoderKL, "VAE").items():
        tensors[VAE_PREFIX + key] = value
    text_state = {
        k: v for k, v in text_encoder.transformer.state_dict().items() if not k.endswith("position_ids")
    }
    expected_text = CLIPTextEncoder.from_config(
        {k: text_config[k] for k in _TEXT_CONFIG_FIELDS}, device="meta"
    )
    problems = state_dict_mismatches(expected_text.transformer.state_dict(), text_state)
    if problems:
        raise ValueError(f"cannot export the text encoder: not a plain CLIP text model ({problems})")
    if version == "v1":
        for key, value in text_state.items():
            tensors[CLIP_PREFIX + key] = value
        positions = int(text_config["max_position_embeddings"])
        tensors[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    else:
        for key, value in hf_to_openclip(text_state).items():
            tensors[OPENCLIP_PREFIX + key] = value
    if schedule is not None:
        tensors["betas"] = schedule.betas.float()
        tensors["alphas_cumprod"] = schedule.alphas_cumprod.float()
    if parameterization == "v":
        tensors["v_pred"] = torch.tensor([])
    tensors = {k: _tensor_for_file(v, target) for k, v in tensors.items()}

    arch_version = version_of(unet_config, text_config)
    resolution = int(resolution or (768 if arch_version == "v2" and parameterization == "v" else 512))
    config = {
        "version": arch_version,
        "unet": unet_config,
        "vae": vae_config,
        "text_encoder": text_config,
        "schedule": describe_schedule(schedule) if schedule is not None else dict(_SD_SCHEDULE),
        "parameterization": parameterization,
        "scale_factor": float(scale_factor),
        "resolution": resolution,
    }
    architecture = {"v1": "stable-diffusion-v1", "v2": "stable-diffusion-v2"}.get(arch_version, "ldm-custom")
    header = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(config),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture
        + ("-768-v" if arch_version == "v2" and parameterization == "v" else ""),
        "modelspec.prediction_type": {"eps": "epsilon", "v": "v"}.get(parameterization, parameterization),
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    tokenizer = getattr(text_encoder, "tokenizer", None)
    if embed_tokenizer is None:
        embed_tokenizer = tokenizer is not None and len(tokenizer) != STANDARD_CLIP_VOCAB
    if embed_tokenizer:
        if tokenizer is None:
            raise ValueError("embed_tokenizer=True but the text encoder has no tokenizer")
        tokenizer.model_max_length = text_encoder.max_length
        for name, text in tokenizer_files(tokenizer).items():
            header[TOKENIZER_METADATA_PREFIX + name] = text
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    log.info(f"wrote {path} ({len(tensors)} tensors, {target}, SD {version} layout)")
    return path


def export_components(components: SDComponents, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``export_single_file`` with the components' schedule, parameterization, scale factor and resolution."""
    kwargs = {
        "schedule": components.schedule,
        "parameterization": components.parameterization,
        "scale_factor": components.scale_factor,
        "resolution": components.resolution,
        **kwargs,
    }
    return export_single_file(path, components.unet, components.vae, components.text_encoder, **kwargs)


def export_from_lightning(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str = torch.float16,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """One of our Lightning checkpoints -> SD single file (the EMA UNet when ``use_ema`` and it has one)."""
    from ldm.io.base_model import components_from_lightning

    components = components_from_lightning(ckpt, use_ema=use_ema)
    info = {"ldm.source": Path(ckpt).name, "ldm.ema": str(bool(use_ema))}
    return export_components(components, out, dtype=dtype, metadata={**info, **(metadata or {})})
