"""kohya-ss LoRA files: the ``.safetensors`` format AUTOMATIC1111, ComfyUI, kohya sd-scripts and
diffusers (``load_lora_weights``) read.

Layout (one entry per adapted layer; ``<name>`` is the module path with ``.`` replaced by ``_``):

* UNet: ``lora_unet_<diffusers UNet module path>``, e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` for our
  ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` (SD v1 config),
  ``lora_unet_mid_block_attentions_0_proj_in``, ``lora_unet_up_blocks_1_attentions_2_proj_out``.
* text encoder: ``lora_te_<transformers CLIP path>``, e.g.
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, ``lora_te_text_model_encoder_layers_11_mlp_fc2``.
* tensors per entry: ``<name>.lora_down.weight`` [r, in] (conv: [r, in, kh, kw]),
  ``<name>.lora_up.weight`` [out, r] (conv: [out, r, 1, 1]), ``<name>.alpha`` 0-d float
  (scale = alpha / r; a missing alpha means alpha = r).
* metadata (str -> str): ``ss_network_module=networks.lora``, ``ss_network_dim``,
  ``ss_network_alpha``, ``ss_base_model_version`` (``sd_v1`` / ``sd_v2``), ``ss_v2``,
  ``ss_training_comment``, ``ss_output_name``, ``ss_network_train_unet_only``,
  ``sshs_model_hash`` (sha256 of the tensor data, as sd-webui-additional-networks computes it),
  ``ss_network_args`` (JSON, ``conv_dim``/``conv_alpha`` when 3x3 convs are adapted), plus the
  caller's entries (e.g. ``ss_steps``, ``ss_resolution``), which win over the defaults.

Our UNet keeps the original LDM module names (``input_blocks`` / ``middle_block`` /
``output_blocks``); ``unet_module_names`` maps them to diffusers module paths for the given UNet's
configuration (levels, ``num_res_blocks``, which levels carry attention), read from the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from ldm.modules.adapters.lora import LoRALayer, lora_modules, make_lora_layer
from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet import Downsample, ResBlock, UNetModel, Upsample

__all__ = [
    "TEXT_ENCODER_PREFIX",
    "UNET_PREFIX",
    "apply_lora_tensors",
    "collect_lora_tensors",
    "find_unet",
    "kohya_module_map",
    "load_kohya_lora",
    "read_kohya_metadata",
    "save_kohya_lora",
    "text_encoder_module_names",
    "unet_module_names",
]

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"

# LDM ResBlock layer -> diffusers ResnetBlock2D layer.
_RESNET_LAYERS = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
}


# ------------------------------------------------------------------------------------------ names


def find_unet(module: nn.Module) -> UNetModel:
    """``module`` itself if it is a ``UNetModel``, else its only ``UNetModel`` submodule."""
    if isinstance(module, UNetModel):
        return module
    found = [m for m in module.modules() if isinstance(m, UNetModel)]
    if len(found) != 1:
        raise TypeError(f"expected a UNetModel or a module holding exactly one, got {type(module).__name__}")
    return found[0]


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d / LoRA layers of ``model`` by qualified name (not the LoRA layers' insides)."""
    out: dict[str, nn.Module] = {}
    lora_names: set[str] = set()
    for name, module in model.named_modules():
        ancestor = name
        while "." in ancestor:
            ancestor = ancestor.rpartition(".")[0]
            if ancestor in lora_names:
                break
        else:
            if isinstance(module, LoRALayer):
                lora_names.add(name)
            if isinstance(module, (LoRALayer, nn.Linear, nn.Conv2d)):
                out[name] = module
    return out


def _ldm_to_diffusers(name: str, unet: UNetModel, layers: int) -> str:
    """One LDM UNet module name -> diffusers ``UNet2DConditionModel`` module name."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    parts = name.split(".")

    def inner(block: nn.Module, position: int, rest: str, prefix: str, index: int) -> str:
        sub = block[position]
        if isinstance(sub, ResBlock) and rest in _RESNET_LAYERS:
            return f"{prefix}.resnets.{index}.{_RESNET_LAYERS[rest]}"
        if isinstance(sub, SpatialTransformer):
            return f"{prefix}.attentions.{index}.{rest}"
        if isinstance(sub, Downsample) and rest == "op":
            return f"{prefix}.downsamplers.0.conv"
        if isinstance(sub, Upsample) and rest == "conv":
            return f"{prefix}.upsamplers.0.conv"
        raise KeyError(name)

    if parts[0] in ("input_blocks", "output_blocks") and len(parts) >= 4:
        n, position, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        if parts[0] == "input_blocks":
            level, j = divmod(n - 1, layers + 1)
            return inner(unet.input_blocks[n], position, rest, f"down_blocks.{level}", j)
        level, j = divmod(n, layers + 1)
        return inner(unet.output_blocks[n], position, rest, f"up_blocks.{level}", j)
    if parts[0] == "middle_block" and len(parts) >= 3:
        position, rest = int(parts[1]), ".".join(parts[2:])
        # middle_block = (ResBlock, SpatialTransformer, ResBlock) = resnets.0, attentions.0, resnets.1
        return inner(unet.middle_block, position, rest, "mid_block", position // 2)
    raise KeyError(name)


def unet_module_names(unet: nn.Module) -> dict[str, str]:
    """``{LDM module name: diffusers module name}`` for every Linear / Conv2d (or LoRA layer) of
    ``unet`` (a ``UNetModel`` or a module holding one; names are relative to the ``UNetModel``).

    The mapping depends on the configuration, which is read from the module: the number of levels
    (Downsample count + 1) and ``num_res_blocks`` (``len(input_blocks) = levels * (num_res_blocks+1)``).
    """
    unet = find_unet(unet)
    levels = 1 + sum(isinstance(m, Downsample) for m in unet.input_blocks.modules())
    layers = len(unet.input_blocks) // levels - 1
    if levels * (layers + 1) != len(unet.input_blocks) or len(unet.output_blocks) != len(unet.input_blocks):
        raise ValueError("UNet layout is not the LDM one (input/output block counts disagree)")
    out = {}
    for name in _adaptable_modules(unet):
        try:
            out[name] = _ldm_to_diffusers(name, unet, layers)
        except (KeyError, IndexError, ValueError) as err:
            raise KeyError(f"no diffusers name for UNet module {name!r}") from err
    return out


def text_encoder_module_names(text_encoder: nn.Module) -> dict[str, str]:
    """``{module name: transformers CLIP path}`` for the Linear layers of a CLIP text encoder's
    transformer layers (``CLIPTextEncoder``, its ``.transformer``, or a ``CLIPTextModel`` of
    transformers 4 or 5): ``...encoder.layers.3.mlp.fc1`` -> ``text_model.encoder.layers.3.mlp.fc1``."""
    out = {}
    for name in _adaptable_modules(text_encoder):
        index = name.find("encoder.layers.")
        if index == 0 or (index > 0 and name[index - 1] == "."):
            out[name] = "text_model." + name[index:]
    if not out:
        raise ValueError(f"no CLIP encoder layers (`encoder.layers.N`) in {type(text_encoder).__name__}")
    return out


def kohya_module_map(
    unet: nn.Module | None = None, text_encoder: nn.Module | None = None, ldm_aliases: bool = False
) -> dict:
    """``{kohya name: (component, module name)}`` for every adaptable layer; component is
    ``"unet"`` or ``"text_encoder"``; UNet module names are relative to the ``UNetModel``.

    ``ldm_aliases`` also maps the LDM-named variant some tools write
    (``lora_unet_input_blocks_4_1_proj_in``), which A1111 reads too."""
    mapping: dict[str, tuple[str, str]] = {}
    if unet is not None:
        for ours, theirs in unet_module_names(unet).items():
            mapping[UNET_PREFIX + theirs.replace(".", "_")] = ("unet", ours)
            if ldm_aliases:
                mapping.setdefault(UNET_PREFIX + ours.replace(".", "_"), ("unet", ours))
    if text_encoder is not None:
        for ours, theirs in text_encoder_module_names(text_encoder).items():
            mapping[TEXT_ENCODER_PREFIX + theirs.replace(".", "_")] = ("text_encoder", ours)
    return mapping


# ------------------------------------------------------------------------------------------ saving


def collect_lora_tensors(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    module_map: Callable[[UNetModel | None, nn.Module | None], Mapping[str, tuple[str, str]]],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], list[LoRALayer]]:
    """``{file module name: (down, up, alpha)}`` for every LoRA layer, named by the file format's
    ``module_map(unet, text_encoder)`` (``{file module name: (component, module name)}``, e.g.
    ``kohya_module_map``), plus the layers themselves. ``unet`` may be any module holding one UNet."""
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder carrying LoRA layers")
    unet = None if unet is None else find_unet(unet)
    name_of = {v: k for k, v in module_map(unet, text_encoder).items()}
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    layers: list[LoRALayer] = []
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        for name, layer in lora_modules(model).items():
            key = (component, name)
            if key not in name_of:
                raise KeyError(f"LoRA layer {component}.{name} has no name in the file format")
            entries[name_of[key]] = (layer.lora_down.weight, layer.lora_up.weight, layer.alpha)
            layers.append(layer)
    if not entries:
        raise ValueError("no LoRA layers to save: inject_lora into the unet and/or text encoder first")
    return entries, layers


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _tensor_data_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a safetensors file's bytes after its header (independent of metadata)."""
    blob = save(dict(tensors))
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header :]).hexdigest()


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _metadata_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _base_model_version(unet: nn.Module | None, text_encoder: nn.Module | None) -> str:
    if unet is not None:
        transformers = [m for m in find_unet(unet).modules() if isinstance(m, SpatialTransformer)]
        return "sd_v2" if transformers and transformers[0].use_linear else "sd_v1"
    hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if hidden is None and hasattr(text_encoder, "hidden_size"):
        hidden = text_encoder.hidden_size
    return "sd_v2" if hidden == 1024 else "sd_v1"


def save_kohya_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the LoRA layers injected into ``unet`` / ``text_encoder`` as a kohya ``.safetensors``.

    ``metadata`` entries (values stringified; dicts/lists as JSON) override the computed ``ss_*``
    defaults (see the module docstring). ``dtype`` casts the up/down weights (e.g. ``torch.float16``);
    alpha is stored as a 0-d float32. The write is atomic. Returns the path.
    """
    path = Path(path)
    entries, layers = collect_lora_tensors(unet, text_encoder, kohya_module_map)

    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up, alpha) in entries.items():
        down, up = down.detach(), up.detach()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        tensors[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)

    # kohya: network_dim/alpha for linears and 1x1 convs, conv_dim/conv_alpha for larger kernels.
    convs = [layer for layer in layers if tuple(layer.weight.shape[2:]) not in ((), (1, 1))]
    plain = [layer for layer in layers if tuple(layer.weight.shape[2:]) in ((), (1, 1))]
    rank_layers = plain or convs
    version = _base_model_version(unet, text_encoder)
    defaults: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(layer.rank for layer in rank_layers)),
        "ss_network_alpha": str(float(_most_common(layer.alpha for layer in rank_layers))),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_training_comment": "",
        "ss_output_name": path.stem,
        "ss_network_train_unet_only": str(not any(k.startswith(TEXT_ENCODER_PREFIX) for k in entries)),
        "sshs_model_hash": _tensor_data_hash(tensors),
    }
    if convs:
        defaults["ss_network_args"] = json.dumps(
            {
                "conv_dim": str(_most_common(layer.rank for layer in convs)),
                "conv_alpha": _format_number(_most_common(layer.alpha for layer in convs)),
            }
        )
    merged = {**defaults, **{str(k): _metadata_str(v) for k, v in (metadata or {}).items()}}
    _atomic_save(tensors, path, merged)
    return path


# ------------------------------------------------------------------------------------------ loading


def read_kohya_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``safetensors`` metadata (str -> str) of a LoRA file, without loading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _group_entries(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"down", "up", "alpha"}}``; unsupported tensor kinds raise ``ValueError``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in _SUFFIXES:
            unsupported.append(key)
            continue
        groups.setdefault(name, {})[_SUFFIXES[suffix]] = value
    if unsupported:
        raise ValueError(
            f"{source}: {len(unsupported)} tensors are not plain LoRA (lora_down.weight / lora_up.weight / alpha), "
            f"e.g. {unsupported[:5]}; LyCORIS (LoHa/LoKr), DoRA and full-diff files are not supported"
        )
    incomplete = [n for n, g in groups.items() if "down" not in g or "up" not in g]
    if incomplete:
        raise ValueError(
            f"{source}: {len(incomplete)} LoRA modules lack lora_down or lora_up, e.g. {incomplete[:5]}"
        )
    return groups


def _fit_shape(name: str, module: nn.Module, down: torch.Tensor, up: torch.Tensor):
    """Check and reshape down/up to the layout ``module`` needs ([r, in] / 4-D for convs)."""
    # Linear (or LoRALinear) weight [out, in]; Conv2d (or LoRAConv2d) weight [out, in, kh, kw].
    out_dim, in_dim, *kernel = module.weight.shape
    kernel = tuple(kernel)
    is_conv = module.weight.ndim == 4
    rank = down.shape[0]
    if is_conv:
        if down.ndim == 2 and kernel == (1, 1):
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        expected_down, expected_up = (rank, in_dim, *kernel), (out_dim, rank, 1, 1)
    else:
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0]
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up[:, :, 0, 0]
        expected_down, expected_up = (rank, in_dim), (out_dim, rank)
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        raise ValueError(
            f"LoRA {name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit "
            f"{type(module).__name__} (expected {expected_down} / {expected_up})"
        )
    return down, up


def apply_lora_tensors(
    entries: Mapping[str, Mapping[str, torch.Tensor]],
    module_map: Mapping[str, tuple[str, str]],
    models: Mapping[str, nn.Module | None],
    multiplier: float = 1.0,
    merge: bool = False,
    strict: bool = True,
    source: str = "LoRA file",
    component_of: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Inject (or merge) LoRA entries ``{file module name: {"down", "up", ["alpha"]}}``.

    ``module_map``: ``{file module name: (component, module name)}``; ``models``: component ->
    module. ``merge=False`` wraps each target in a LoRA layer (rank/alpha from the entry) holding the
    weights, with ``multiplier`` set; ``merge=True`` adds ``multiplier * alpha/r * up @ down`` to the
    target's weight directly (no new modules; loading several files this way stacks them, and a
    second load with ``-multiplier`` takes one out again). ``strict``: entries whose module does not
    exist (or whose component was not given) raise ``KeyError``; otherwise they are skipped and listed.
    ``component_of``: file module name -> component (to tell "not given" from "unknown").
    """

    def component(name: str) -> str | None:
        if component_of is not None:
            return component_of(name)
        return module_map[name][0] if name in module_map else None

    absent = [n for n in entries if (c := component(n)) is not None and models.get(c) is None]
    unknown = [n for n in entries if n not in module_map and n not in absent]
    if strict and unknown:
        raise KeyError(
            f"{source}: {len(unknown)} of {len(entries)} LoRA modules map to no module of the given "
            f"model(s), e.g. {unknown[:5]}"
        )
    if strict and absent:
        components = sorted({component(n) for n in absent})
        raise KeyError(
            f"{source} has LoRA modules for {components} but none was given "
            f"(pass it, or strict=False to skip them), e.g. {absent[:3]}"
        )
    skipped = unknown + absent
    todo = [n for n in entries if n not in skipped]
    if not todo:
        raise KeyError(f"{source}: no LoRA module of the file applies to the given model(s)")

    targets = Counter(module_map[n] for n in todo)
    duplicates = [f"{c}.{m}" for (c, m), count in targets.items() if count > 1]
    if duplicates:
        raise ValueError(f"{source}: several entries target the same module, e.g. {duplicates[:5]}")

    # Validate everything before touching any module (no half-applied file on error).
    plan = []
    for name in todo:
        component, module_name = module_map[name]
        model = models[component]
        module = model.get_submodule(module_name)
        if not merge and isinstance(module, LoRALayer):
            raise ValueError(
                f"{component}.{module_name} already carries a LoRA: remove_lora() first, or load with "
                "merge=True to stack files"
            )
        down, up = _fit_shape(name, module, entries[name]["down"], entries[name]["up"])
        rank = down.shape[0]
        alpha = float(entries[name]["alpha"].float()) if "alpha" in entries[name] else float(rank)
        plan.append((name, component, module_name, model, module, down, up, rank, alpha))

    loaded = []
    for name, component, module_name, model, module, down, up, rank, alpha in plan:
        if merge:
            _merge_into(module, down, up, multiplier * alpha / rank)
        else:
            layer = make_lora_layer(module, rank=rank, alpha=alpha)
            with torch.no_grad():
                layer.lora_down.weight.copy_(down)
                layer.lora_up.weight.copy_(up)
            layer.multiplier = multiplier
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        loaded.append((component, module_name, rank, alpha))
    for model in {id(m): m for m in models.values() if m is not None}.values():
        for sub in model.modules():
            clear = getattr(sub, "clear_cache", None)
            if callable(clear):
                clear()

    ranks = sorted({r for *_, r, _ in loaded})
    alphas = sorted({a for *_, a in loaded})
    return {
        "modules": len(loaded),
        "unet_modules": sum(c == "unet" for c, *_ in loaded),
        "text_encoder_modules": sum(c == "text_encoder" for c, *_ in loaded),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "module_names": [f"{c}.{n}" for c, n, *_ in loaded],
        "skipped": skipped,
        "multiplier": float(multiplier),
        "merged": bool(merge),
    }


@torch.no_grad()
def _merge_into(module: nn.Module, down: torch.Tensor, up: torch.Tensor, factor: float) -> None:
    weight = module.weight
    delta = up.float().flatten(1) @ down.float().flatten(1)
    delta = (factor * delta).view(weight.shape).to(weight.device)
    weight.copy_(weight.float() + delta)


def load_kohya_lora(
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    multiplier: float = 1.0,
    merge: bool = False,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Apply a kohya LoRA file (or its tensor dict) to ``unet`` / ``text_encoder``.

    ``merge=False``: injects ``LoRALinear`` / ``LoRAConv2d`` layers with rank and alpha from the file
    (per module; missing alpha = rank; fp16/bf16 tensors are cast to the model's dtype) and
    ``multiplier`` as their inference strength; they are trainable (``lora_parameters``) and
    ``remove_lora`` takes them out. ``merge=True``: folds ``multiplier * alpha/r * up @ down`` into
    the weights in place (no module changes), so several files stack with their own multipliers.
    ``strict`` (default): a module name that maps to no module of the given model(s), or a component
    that was not passed, raises ``KeyError`` naming the first keys; non-LoRA tensors (LyCORIS, DoRA)
    raise ``ValueError``. Returns a summary: ``modules`` (count), ``unet_modules``,
    ``text_encoder_modules``, ``rank`` / ``alpha`` (a value, or the sorted distinct values),
    ``module_names``, ``skipped``, ``metadata``, ``multiplier``, ``merged``.
    """
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder to load the LoRA into")
    unet = None if unet is None else find_unet(unet)
    if isinstance(path, Mapping):
        tensors, metadata, source = dict(path), {}, "LoRA state dict"
    else:
        tensors, metadata, source = load_file(str(path)), read_kohya_metadata(path), str(path)
    bad_prefix = [k for k in tensors if not k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX))]
    if bad_prefix:
        raise KeyError(
            f"{source}: {len(bad_prefix)} keys are not kohya LoRA keys (lora_unet_* / lora_te_*), "
            f"e.g. {bad_prefix[:5]} (SDXL lora_te1_/lora_te2_ files are not supported)"
        )
    entries = _group_entries(tensors, source)
    summary = apply_lora_tensors(
        entries,
        kohya_module_map(unet, text_encoder, ldm_aliases=True),
        {"unet": unet, "text_encoder": text_encoder},
        multiplier=multiplier,
        merge=merge,
        strict=strict,
        source=source,
        component_of=_kohya_component,
    )
    summary["metadata"] = metadata
    return summary


def _kohya_component(name: str) -> str:
    return "unet" if name.startswith(UNET_PREFIX) else "text_encoder"
