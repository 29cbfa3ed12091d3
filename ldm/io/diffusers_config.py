"""LDM <-> diffusers config translation: ``UNet2DConditionModel`` / ``AutoencoderKL`` configs and the
scheduler's ``scheduler_config.json`` to our ``UNetModel`` / ``AutoencoderKL`` kwargs and
``DiffusionSchedule`` config, and back (``diffusers_config_from_ldm``). A diffusers config our modules
cannot reproduce (other block types, group counts, embeddings) is refused with the offending field named.

SD v1/v2/XL UNets: SDXL's ``addition_embed_type="text_time"`` is our ``adm_in_channels`` (=
``projection_class_embeddings_input_dim``); its ``addition_time_embed_dim`` (256: the width of each size
number's features, ``ldm.modules.size_embedding``) belongs to the conditioner, not the UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.diffusion.discretization import SAMPLER_DEFAULT
from ldm.modules.unet import depth_kwargs, level_depths

__all__ = [
    "diffusers_config_from_ldm",
    "schedule_from_diffusers",
    "unet_config_from_diffusers",
    "vae_config_from_diffusers",
]


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
                "Diffusion v1/v2/XL architecture)"
            )


def _single(value: Any, what: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"per-block {what} {list(value)} is not supported")
        return value[0]
    return value


# Fields of a diffusers UNet2DConditionModel config that our UNetModel cannot change (SD v1/v2/XL values).
_UNET_FIXED: dict[str, Any] = {
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``UNetModel`` kwargs for a diffusers ``UNet2DConditionModel`` config (SD v1/v2/XL layouts only)."""
    _require(config, "UNet", **_UNET_FIXED)
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
    attention_levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    return {
        "in_channels": config.get("in_channels", 4),
        "out_channels": config.get("out_channels", 4),
        "model_channels": model_channels,
        "channel_mult": [w // model_channels for w in widths],
        "num_res_blocks": _single(config.get("layers_per_block", 2), "layers_per_block"),
        "attention_resolutions": [2**i for i in attention_levels],
        **_heads_from_diffusers(config, widths, attention_levels),
        **_depths_from_diffusers(config, attention_levels, len(widths)),
        "context_dim": _single(config.get("cross_attention_dim", 768), "cross_attention_dim"),
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "use_checkpoint": False,
        "dropout": float(config.get("dropout", 0.0)),
        "use_scale_shift_norm": config.get("resnet_time_scale_shift", "default") == "scale_shift",
        **_label_embedding_from_diffusers(config),
    }


def _heads_from_diffusers(config: Mapping[str, Any], widths: list[int], attention_levels: list[int]) -> dict:
    """``num_heads`` / ``num_head_channels`` from diffusers' per-level head counts."""
    # diffusers' attention_head_dim is, for SD, the number of heads (num_attention_heads when set).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    used = [(heads[i], widths[i] // heads[i]) for i in attention_levels] + [
        (heads[-1], widths[-1] // heads[-1])
    ]
    if len({h for h, _ in used}) == 1:
        return {"num_heads": used[0][0], "num_head_channels": -1}
    if len({d for _, d in used}) == 1:
        return {"num_heads": -1, "num_head_channels": used[0][1]}
    raise ValueError(f"attention heads {heads} vary in count and width: not an LDM UNet layout")


def _depths_from_diffusers(config: Mapping[str, Any], attention_levels: list[int], levels: int) -> dict:
    """``transformer_depth`` (one int when every transformer has the same depth, else one per level, 0 where
    a level has no attention) and ``transformer_depth_middle`` when it differs from the last level's."""
    if config.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError(
            "reverse_transformer_layers_per_block (an asymmetric UNet) is not an LDM UNet layout"
        )
    given = config.get("transformer_layers_per_block", 1)
    given = list(given) if isinstance(given, (list, tuple)) else [given] * levels
    per_level = [_single(d, "transformer_layers_per_block") for d in given]
    middle = per_level[-1]  # diffusers' mid block takes the last level's depth
    if any(per_level[i] < 1 for i in attention_levels) or middle < 1:
        raise ValueError(f"transformer_layers_per_block {given} gives a cross-attention block no transformer")
    return depth_kwargs([per_level[i] if i in attention_levels else 0 for i in range(levels)], middle)


def _label_embedding_from_diffusers(config: Mapping[str, Any]) -> dict:
    """``adm_in_channels`` for SDXL's ``addition_embed_type="text_time"``; nothing for SD v1/v2."""
    kind = config.get("addition_embed_type")
    if kind is None:
        return {}
    if kind != "text_time":
        raise ValueError(
            f"UNet config has addition_embed_type={kind!r}; only None (SD v1/v2) and 'text_time' (SDXL) are "
            "supported"
        )
    if not config.get("projection_class_embeddings_input_dim"):
        raise ValueError(
            "UNet config has addition_embed_type='text_time' but no projection_class_embeddings_input_dim"
        )
    return {"adm_in_channels": int(config["projection_class_embeddings_input_dim"])}


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
    conventions = timestep_convention_from_diffusers(config)
    if config.get("trained_betas"):
        return {"betas": list(config["trained_betas"]), **conventions}, _PREDICTION_TYPES[prediction]
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
        **conventions,
    }
    return schedule, _PREDICTION_TYPES[prediction]


def timestep_convention_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``timestep_spacing``/``steps_offset``/``set_alpha_to_one`` of a ``scheduler_config.json``; absent keys
    take diffusers' defaults: no ``timestep_spacing`` (SD 1.x/2.x folders) is each scheduler's own default,
    so every sampler spaces as its diffusers scheduler swapped in with ``from_config`` would."""
    return {
        "timestep_spacing": str(config.get("timestep_spacing", SAMPLER_DEFAULT)),
        "steps_offset": int(config.get("steps_offset", 0)),
        "set_alpha_to_one": bool(
            config.get("set_alpha_to_one", config.get("_class_name") != "PNDMScheduler")
        ),
    }


def diffusers_config_from_ldm(
    in_channels: int = 4,
    out_channels: int = 4,
    model_channels: int = 320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks: int = 2,
    attention_resolutions=(4, 2, 1),
    num_heads: int = 8,
    num_head_channels: int = -1,
    transformer_depth=1,
    context_dim: int | None = 768,
    use_linear_in_transformer: bool = False,
    use_scale_shift_norm: bool = False,
    transformer_depth_middle: int | None = None,
    adm_in_channels: int | None = None,
    addition_time_embed_dim: int = 256,
    **_ignored,
) -> dict:
    """``UNet2DConditionModel(**config)`` kwargs for the architecture of ``UNetModel(**kwargs)``.

    diffusers' ``attention_head_dim`` is (for historical reasons) the number of heads. With
    ``adm_in_channels`` (SDXL) the label embedding is ``addition_embed_type="text_time"``, whose
    ``addition_time_embed_dim`` (features per size number; 256 in SDXL) our UNet does not hold.
    """
    depths, middle = level_depths(transformer_depth, transformer_depth_middle, len(channel_mult))
    with_attention = [2**level in attention_resolutions and d > 0 for level, d in enumerate(depths)]
    widths = [model_channels * m for m in channel_mult]
    heads = [w // num_head_channels if num_head_channels > 0 else num_heads for w in widths]
    config = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": tuple(widths),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
        "layers_per_block": num_res_blocks,
        "attention_head_dim": heads if num_head_channels > 0 else num_heads,
        "transformer_layers_per_block": _diffusers_depths(depths, middle, with_attention),
        "cross_attention_dim": context_dim,
        "use_linear_projection": use_linear_in_transformer,
        "resnet_time_scale_shift": "scale_shift" if use_scale_shift_norm else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    }
    if adm_in_channels is not None:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=adm_in_channels,
        )
    return config


def _diffusers_depths(depths: list[int], middle: int, with_attention: list[bool]) -> int | tuple[int, ...]:
    """diffusers' ``transformer_layers_per_block``: one int when all transformers share a depth, else one per
    level; its mid block takes the last level's value, so a different middle depth needs a last level
    without attention."""
    used = {d for d, a in zip(depths, with_attention) if a} | {middle}
    if len(used) == 1:
        return middle
    if with_attention[-1] and depths[-1] != middle:
        raise ValueError(
            f"diffusers' UNet2DConditionModel cannot hold a middle transformer depth {middle} that differs "
            f"from the last level's {depths[-1]}"
        )
    return tuple(depths[:-1]) + (middle,)
