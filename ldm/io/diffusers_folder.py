"""Diffusers Stable Diffusion folders and hub repos -> our modules.

A folder holds ``model_index.json``, ``unet/`` and ``vae/`` (``config.json`` + weights), ``text_encoder/``
and ``tokenizer/`` (transformers CLIP, already our layout) and ``scheduler/scheduler_config.json`` (beta
schedule and ``prediction_type``). The UNet keys are renamed with ``diffusers_unet_to_ldm``, the VAE keys
with ``diffusers_vae_to_ldm`` below; architectures come from the configs, and a config our modules cannot
reproduce (other block types, group counts, embeddings) is refused with the offending field named.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.io.diffusers_unet_keys import diffusers_unet_to_ldm
from ldm.io.stable_diffusion import (
    SDComponents,
    build_schedule,
    finalize,
    load_strict,
    safe_torch_load,
    version_of,
)
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from ldm.utils.logging import get_logger

log = get_logger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a complete diffusers Stable Diffusion folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _require(config: Mapping[str, Any], what: str, **expected: Any) -> None:
    """Raise when a config field that our modules cannot change differs from the supported value."""
    for key, value in expected.items():
        got = config.get(key, value)
        if isinstance(got, (list, tuple)) and not isinstance(value, (list, tuple)):
            ok = all(g == value for g in got)
        else:
            ok = got == value
        if not ok:
            raise ValueError(
                f"{what} config has {key}={got!r}; only {value!r} is supported (not a Stable "
                "Diffusion v1/v2 architecture)"
            )


def _single(value: Any, what: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"per-block {what} {list(value)} is not supported")
        return value[0]
    return value


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``UNetModel`` kwargs for a diffusers ``UNet2DConditionModel`` config (SD v1/v2 layouts only)."""
    _require(
        config,
        "UNet",
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        class_embed_type=None,
        addition_embed_type=None,
        num_class_embeds=None,
        encoder_hid_dim=None,
        time_cond_proj_dim=None,
        time_embedding_type="positional",
        time_embedding_dim=None,
        timestep_post_act=None,
        conv_in_kernel=3,
        conv_out_kernel=3,
        only_cross_attention=False,
        dual_cross_attention=False,
        mid_block_type="UNetMidBlock2DCrossAttn",
        resnet_skip_time_act=False,
        resnet_out_scale_factor=1.0,
        attention_type="default",
        downsample_padding=1,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    if not set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"} or not set(up) <= {
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    }:
        raise ValueError(f"UNet block types {down} / {up} are not those of Stable Diffusion")
    if [t.replace("Up", "Down") for t in reversed(up)] != down:
        raise ValueError(f"up blocks {up} do not mirror the down blocks {down}")
    widths = list(config["block_out_channels"])
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    # diffusers' attention_head_dim is, for SD, the number of heads (num_attention_heads when set).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    attention_levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    used = [(heads[i], widths[i] // heads[i]) for i in attention_levels] + [
        (heads[-1], widths[-1] // heads[-1])
    ]
    if len({h for h, _ in used}) == 1:
        num_heads, num_head_channels = used[0][0], -1
    elif len({d for _, d in used}) == 1:
        num_heads, num_head_channels = -1, used[0][1]
    else:
        raise ValueError(f"attention heads {heads} vary in count and width: not an LDM UNet layout")
    return {
        "in_channels": config.get("in_channels", 4),
        "out_channels": config.get("out_channels", 4),
        "model_channels": model_channels,
        "channel_mult": [w // model_channels for w in widths],
        "num_res_blocks": _single(config.get("layers_per_block", 2), "layers_per_block"),
        "attention_resolutions": [2**i for i in attention_levels],
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "transformer_depth": _single(
            config.get("transformer_layers_per_block", 1), "transformer_layers_per_block"
        ),
        "context_dim": _single(config.get("cross_attention_dim", 768), "cross_attention_dim"),
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "use_checkpoint": False,
        "dropout": float(config.get("dropout", 0.0)),
        "use_scale_shift_norm": config.get("resnet_time_scale_shift", "default") == "scale_shift",
    }


def vae_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs for a diffusers ``AutoencoderKL`` config (the LDM kl-f* layout)."""
    _require(
        config,
        "VAE",
        act_fn="silu",
        mid_block_add_attention=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
        shift_factor=None,
        latents_mean=None,
        latents_std=None,
        down_block_types="DownEncoderBlock2D",
        up_block_types="UpDecoderBlock2D",
    )
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"VAE block_out_channels {widths} are not multiples of the first")
    latent = int(config.get("latent_channels", 4))
    return {
        "embed_dim": latent,
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)),
        "z_channels": latent,
        "attn_resolutions": [],
        "resolution": int(config.get("sample_size", 256)),
        "norm_groups": int(config.get("norm_num_groups", 32)),
    }


_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def schedule_from_diffusers(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(``DiffusionSchedule`` config, parameterization) from a diffusers ``scheduler_config.json``."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {prediction!r} is not supported")
    if config.get("trained_betas"):
        return {"betas": list(config["trained_betas"])}, _PREDICTION_TYPES[prediction]
    kind = config.get("beta_schedule", "linear")
    if kind not in _BETA_SCHEDULES:
        raise ValueError(
            f"scheduler beta_schedule {kind!r} is not supported; expected one of {sorted(_BETA_SCHEDULES)}"
        )
    schedule = {
        "kind": _BETA_SCHEDULES[kind],
        "num_timesteps": int(config.get("num_train_timesteps", 1000)),
        "linear_start": float(config.get("beta_start", 0.0001)),
        "linear_end": float(config.get("beta_end", 0.02)),
        "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
    }
    return schedule, _PREDICTION_TYPES[prediction]


# ----------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = safe_torch_load(path)
    return dict(payload.get("state_dict", payload))


def read_component_weights(
    folder: Path, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> dict[str, torch.Tensor]:
    """Weights of one component folder: ``<stem>[.<variant>].safetensors``, a sharded ``.index.json``, or a
    weights-only ``.bin`` (in that order of preference)."""
    infix = f".{variant}" if variant else ""
    candidates = [
        f"{stem}{infix}.safetensors",
        f"{stem}{infix}.safetensors.index.json",
        f"{stem}{infix}.bin",
        f"{stem}{infix}.bin.index.json",
    ]
    if not variant:
        candidates += [f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"]
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(_read_json(path)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_weights_file(folder / shard))
            return state
        return _load_weights_file(path)
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(candidates)})")


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def diffusers_vae_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM layout of ``ldm.modules.vae``.

    ``up_blocks`` count from the lowest resolution, LDM's ``decoder.up`` from the highest. Attention
    projections are Linear ``[C, C]`` in diffusers and 1x1 convs ``[C, C, 1, 1]`` here. Unknown keys raise.
    """
    num_up = 1 + max(
        (int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename_vae(key, num_up)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _rename_vae(key: str, num_up: int) -> str:
    if re.fullmatch(r"(quant_conv|post_quant_conv|(encoder|decoder)\.conv_(in|out))\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m and m[2] in _VAE_ATTENTION:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    raise KeyError(f"no LDM name for diffusers VAE key {key!r}")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def load_diffusers_folder(
    folder: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    *,
    parameterization: str | None = None,
    scale_factor: float | None = None,
    resolution: int | None = None,
    schedule: Mapping[str, Any] | None = None,
    variant: str | None = None,
) -> SDComponents:
    """Components of a diffusers Stable Diffusion folder.

    ``use_ema``: the released repos keep the EMA UNet as the default weights and the raw ones as the
    ``non_ema`` variant; ``use_ema=False`` takes that variant when present. ``variant`` picks another
    (e.g. ``"fp16"``). The scheduler config gives the schedule and parameterization; the VAE config the
    scale factor; the UNet ``sample_size`` times the VAE factor the resolution. Keyword arguments override.
    """
    root = Path(folder).expanduser()
    index = _read_json(root / "model_index.json")
    name = str(root)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ValueError(
            f"{name} is an SDXL pipeline ({index.get('_class_name')}); only SD v1/v2 are supported"
        )
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"{name} has no {part}/ folder: not a complete diffusers Stable Diffusion model"
            )

    unet_cfg = _read_json(root / "unet" / "config.json")
    unet_config = unet_config_from_diffusers(unet_cfg)
    unet_variant = variant
    if not use_ema and variant is None and any((root / "unet").glob("*.non_ema.*")):
        unet_variant = "non_ema"
        log.info(f"{name}: use_ema=False, loading the unet non_ema weights")
    try:
        unet_state = diffusers_unet_to_ldm(
            read_component_weights(root / "unet", variant=unet_variant), unet_cfg
        )
    except KeyError as err:
        raise ValueError(f"{name}/unet: {err.args[0]}") from None
    unet = load_strict(_meta(UNetModel, unet_config), unet_state, "UNet", f"{name}/unet")

    vae_cfg = _read_json(root / "vae" / "config.json")
    vae_config = vae_config_from_diffusers(vae_cfg)
    try:
        vae_state = diffusers_vae_to_ldm(read_component_weights(root / "vae", variant=variant))
    except KeyError as err:
        raise ValueError(f"{name}/vae: {err.args[0]}") from None
    vae = load_strict(_meta(AutoencoderKL, vae_config), vae_state, "VAE", f"{name}/vae")

    text_encoder = CLIPTextEncoder.from_pretrained(root)
    if text_encoder.hidden_size != unet_config["context_dim"]:
        raise ValueError(
            f"{name}: text encoder width {text_encoder.hidden_size} != UNet cross_attention_dim "
            f"{unet_config['context_dim']}"
        )

    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        schedule_config, detected = schedule_from_diffusers(_read_json(scheduler_file))
    else:
        log.warning(f"{name}: no scheduler/scheduler_config.json; assuming SD's scaled_linear eps schedule")
        schedule_config, detected = (
            {"kind": "scaled_linear", "linear_start": 0.00085, "linear_end": 0.012},
            "eps",
        )
    schedule_config = {**schedule_config, **dict(schedule or {})}
    factor = 2 ** (len(vae_config["ch_mult"]) - 1)
    components = SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        schedule=build_schedule(schedule_config),
        parameterization=parameterization or detected,
        scale_factor=float(
            scale_factor if scale_factor is not None else vae_cfg.get("scaling_factor", 0.18215)
        ),
        version=version_of(unet_config, {"hidden_size": text_encoder.hidden_size}),
        resolution=int(resolution or int(unet_cfg.get("sample_size", 64)) * factor),
    )
    return finalize(components, dtype)


def _meta(factory, config):
    with torch.device("meta"):
        return factory(**config)


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.endswith(
        (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
    )


def download_from_hub(
    repo_id: str,
    use_ema: bool = True,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local snapshot of a diffusers repo (only the parts we load; safetensors weights). With
    ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is used, and a miss is a fast clear ``OSError``."""
    from huggingface_hub import snapshot_download

    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    allow = [
        "model_index.json",
        "*/config.json",
        "*/*.txt",
        "tokenizer/*.json",
        "scheduler/*.json",
        f"unet/{weights}",
        f"vae/{weights}",
        f"text_encoder/{weights}",
        "*/*.safetensors.index.json",
    ]
    if not use_ema and not variant:
        allow.append("unet/*.non_ema.safetensors")
    ignore = [] if variant else ["*.fp16.*"]
    if use_ema or variant:
        ignore.append("*non_ema*")
    offline = any(
        os.environ.get(n, "").strip().lower() in {"1", "on", "yes", "true"}
        for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow,
            ignore_patterns=ignore,
            local_files_only=offline,
            cache_dir=os.fspath(cache_dir) if cache_dir else None,
        )
    except Exception as err:
        why = (
            "HF_HUB_OFFLINE=1, and the local Hugging Face cache does not hold it"
            if offline
            else f"it could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        )
        raise OSError(
            f"{repo_id!r} is not a local file or folder, so it was read as a Hugging Face Hub id, but {why}. "
            "Download it on a machine with network access "
            f"(e.g. `huggingface-cli download {repo_id}`) and pass "
            "the local folder, or pass a local .safetensors file"
            + ("" if offline else ", or check the id and your network")
            + "."
        ) from err
    return Path(path)
