"""The SDXL UNet as a configuration of ours (conf/model/unet/sdxl.yaml, sdxl_refiner.yaml): per-level
transformer depth, the label embedding of ``y`` (pooled text + size features), parity with diffusers'
``UNet2DConditionModel`` ("text_time") on tiny configs, and the full configs' released key layout."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.io.describe import describe_unet
from ldm.io.diffusers_config import diffusers_config_from_ldm, unet_config_from_diffusers
from ldm.io.diffusers_names import diffusers_unet_to_ldm, unet_module_names
from ldm.io.strict_load import state_dict_mismatches
from ldm.modules.attention import SpatialTransformer
from ldm.modules.size_embedding import SizeEmbedding, size_embedding
from ldm.modules.unet import ResBlock, UNetModel, timestep_embedding
from tests.test_unet import CONF, perturb_zero_init

# Tiny diffusers SDXL-style configs: levels without attention are DownBlock2D/UpBlock2D; attention_head_dim
# is the number of heads per level (16 channels each); the time ids get 8 features per number.
POOLED, TIME_DIM = 16, 8
TINY_XL = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (0, 2),
    "attention_head_dim": (2, 4),
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_DIM,
    "projection_class_embeddings_input_dim": POOLED + 6 * TIME_DIM,
}
THREE_LEVELS = {  # SDXL's shape: no attention at the first level, then depths 1 and 3 (3 in the middle)
    **TINY_XL,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 3),
    "attention_head_dim": (2, 2, 4),
}
REFINER_LIKE = {  # the refiner's shape: attention only in the middle levels, depth 2 there and in the middle
    **TINY_XL,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": 2,
    "attention_head_dim": (2, 4, 4),
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the model)
SDXL_DIFFUSERS_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_time_scale_shift": "default",
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}  # fmt: skip
# Names and shapes of the released SDXL base single file (model.diffusion_model.* without the prefix).
SDXL_KEYS = {
    "time_embed.0.weight": [1280, 320],
    "label_emb.0.0.weight": [1280, 2816],
    "label_emb.0.2.weight": [1280, 1280],
    "input_blocks.1.0.in_layers.2.weight": [320, 320, 3, 3],
    "input_blocks.3.0.op.weight": [320, 320, 3, 3],
    "input_blocks.4.0.skip_connection.weight": [640, 320, 1, 1],
    "input_blocks.4.1.proj_in.weight": [640, 640],
    "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight": [640, 2048],
    "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": [1280, 2048],
    "middle_block.1.transformer_blocks.9.attn2.to_v.weight": [1280, 2048],
    "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": [10240, 1280],
    "middle_block.2.emb_layers.1.weight": [1280, 1280],
    "output_blocks.2.2.conv.weight": [1280, 1280, 3, 3],
    "output_blocks.5.2.conv.weight": [640, 640, 3, 3],
    "output_blocks.5.1.proj_out.weight": [640, 640],
    "output_blocks.8.0.skip_connection.weight": [320, 640, 1, 1],
    "out.2.weight": [4, 320, 3, 3],
}
SDXL_ABSENT = [  # levels without attention: blocks of a ResBlock only; no 11th transformer block
    "input_blocks.1.1.norm.weight",
    "input_blocks.2.1.proj_in.weight",
    "output_blocks.6.1.norm.weight",
    "output_blocks.8.1.conv.weight",
    "input_blocks.7.1.transformer_blocks.10.attn1.to_q.weight",
    "middle_block.1.transformer_blocks.10.attn1.to_q.weight",
]


def load_kwargs(name: str) -> dict:
    kwargs = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    kwargs.pop("_target_")
    return kwargs


def xl_inputs(config: dict, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.tensor([3, 981][:batch])
    context = torch.randn(batch, 7, config["cross_attention_dim"], generator=gen)
    text_embeds = torch.randn(batch, POOLED, generator=gen)
    time_ids = torch.tensor([[1024.0, 768, 0, 64, 1024, 1024], [512, 512, 128, 0, 640, 512]][:batch])
    return x, t, context, text_embeds, time_ids


# ------------------------------------------------------------------------------------------ size embedding


def test_size_embedding_is_a_timestep_embedding_per_number():
    values = torch.tensor([[1024.0, 768, 0, 64, 1024, 1024], [512, 512, 3.5, 0, 640, 512]])
    features = size_embedding(values, 256)
    assert features.shape == (2, 1536)
    for i in range(6):
        torch.testing.assert_close(
            features[:, 256 * i : 256 * (i + 1)], timestep_embedding(values[:, i], 256)
        )
    assert torch.equal(SizeEmbedding(256)(values), features)
    # a number changes only its own 256 features
    moved = values.clone()
    moved[:, 2] += 100
    changed = (size_embedding(moved, 256) != features).any(dim=0).nonzero().flatten()
    assert changed.min() >= 512 and changed.max() < 768
    with pytest.raises(ValueError, match=r"\[batch, numbers\]"):
        size_embedding(values[0])


def test_size_embedding_matches_diffusers_add_time_proj():
    from diffusers.models.embeddings import Timesteps

    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [896, 1152, 32, 16, 832, 1216]])
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(time_ids.flatten()).reshape(2, -1)
    torch.testing.assert_close(size_embedding(time_ids, 256), theirs, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ tiny parity


@pytest.mark.parametrize(
    "config", [TINY_XL, THREE_LEVELS, REFINER_LIKE], ids=["two-levels", "sdxl-shape", "refiner-shape"]
)
def test_parity_with_diffusers_text_time(config):
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    perturb_zero_init(theirs, seed=1)
    kwargs = unet_config_from_diffusers(theirs.config)
    assert kwargs["adm_in_channels"] == POOLED + 6 * TIME_DIM
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(theirs.state_dict(), theirs.config), strict=True)

    x, t, context, text_embeds, time_ids = xl_inputs(config)
    y = torch.cat([text_embeds, size_embedding(time_ids, TIME_DIM)], dim=1)
    with torch.no_grad():
        expected = theirs(
            x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}
        ).sample
        got = ours(x, t, context, y=y)
        other_sizes = ours(
            x, t, context, y=torch.cat([text_embeds, size_embedding(time_ids + 64, TIME_DIM)], 1)
        )
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-5
    assert (other_sizes - got).abs().max() > 1e-3  # the size features reach the output

    # and back: our kwargs -> a diffusers config of the same architecture (the same keys and shapes)
    again = diffusers.UNet2DConditionModel(
        **diffusers_config_from_ldm(**kwargs, addition_time_embed_dim=TIME_DIM)
    )
    assert state_dict_mismatches(theirs.state_dict(), again.state_dict()) == ""


def test_levels_without_attention_hold_only_resblocks():
    kwargs = unet_config_from_diffusers(THREE_LEVELS)
    assert kwargs["transformer_depth"] == [0, 1, 3] and "transformer_depth_middle" not in kwargs
    unet = UNetModel(**kwargs)
    # level 0: input_blocks 1, 2 and output_blocks 6..8 are one ResBlock each; levels 1, 2 add a transformer
    for block in [unet.input_blocks[1], unet.input_blocks[2], *unet.output_blocks[6:]]:
        assert len(block) == 1 and isinstance(block[0], ResBlock)
    depth = {
        n: len(m.transformer_blocks) for n, m in unet.named_modules() if isinstance(m, SpatialTransformer)
    }
    assert depth == {
        "input_blocks.4.1": 1, "input_blocks.5.1": 1, "input_blocks.7.1": 3, "input_blocks.8.1": 3,
        "middle_block.1": 3, "output_blocks.0.1": 3, "output_blocks.1.1": 3, "output_blocks.2.1": 3,
        "output_blocks.3.1": 1, "output_blocks.4.1": 1, "output_blocks.5.1": 1,
    }  # fmt: skip
    assert type(unet.output_blocks[5][2]).__name__ == "Upsample"
    # a depth of 0 at an attention resolution also means no attention there
    same = UNetModel(**{**kwargs, "attention_resolutions": [1, 2, 4]})
    assert state_dict_mismatches(unet.state_dict(), same.state_dict()) == ""


def test_lora_module_names_cover_the_label_embedding():
    import diffusers

    theirs = dict(diffusers.UNet2DConditionModel(**THREE_LEVELS).named_modules())
    names = unet_module_names(UNetModel(**unet_config_from_diffusers(THREE_LEVELS)))
    assert (
        names["label_emb.0.0"] == "add_embedding.linear_1"
        and names["label_emb.0.2"] == "add_embedding.linear_2"
    )
    assert names["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert all(path in theirs for path in names.values())


def test_label_embedding_checks_y():
    kwargs = unet_config_from_diffusers(TINY_XL)
    unet = UNetModel(**kwargs).eval()
    x, t, context, *_ = xl_inputs(TINY_XL)
    with pytest.raises(ValueError, match=r"y \[B, adm_in_channels\] = \[2, 64\].*got y=None"):
        unet(x, t, context)
    with pytest.raises(ValueError, match=r"got y=\[2, 63\]"):
        unet(x, t, context, y=torch.zeros(2, 63))
    # y in float32 (size features are) drives a bf16 UNet: cast to the time embedding's dtype
    with torch.no_grad():
        out = unet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), y=torch.randn(2, 64))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    plain = UNetModel(**{**kwargs, "adm_in_channels": None})
    assert not any(k.startswith("label_emb") for k in plain.state_dict())
    with pytest.raises(ValueError, match="no label embedding"):
        plain(x, t, context, y=torch.zeros(2, 64))


@pytest.mark.parametrize(
    ("depth", "middle", "message"),
    [
        ([1, 2, 3], None, "one depth >= 0 per level"),
        ([1, -1], None, "one depth >= 0"),
        ([2, 0], None, "middle"),
    ],
)
def test_bad_depths_are_refused(depth, middle, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(
            **{
                **unet_config_from_diffusers(TINY_XL),
                "transformer_depth": depth,
                "transformer_depth_middle": middle,
            }
        )


def test_unsupported_diffusers_configs_are_refused():
    with pytest.raises(ValueError, match="addition_embed_type='image'"):
        unet_config_from_diffusers({**TINY_XL, "addition_embed_type": "image"})
    with pytest.raises(ValueError, match="no transformer"):
        unet_config_from_diffusers({**TINY_XL, "transformer_layers_per_block": (1, 0)})
    with pytest.raises(ValueError, match="middle transformer depth 3"):
        diffusers_config_from_ldm(**{**unet_config_from_diffusers(TINY_XL), "transformer_depth_middle": 3})


# ------------------------------------------------------------------------------------------ full size


def test_sdxl_config_has_the_released_layout():
    import diffusers

    kwargs = load_kwargs("sdxl")
    with torch.device("meta"):
        ours = instantiate(OmegaConf.load(CONF / "sdxl.yaml"))
        from_diffusers = UNetModel(**unet_config_from_diffusers(SDXL_DIFFUSERS_CONFIG))
        theirs = diffusers.UNet2DConditionModel(**SDXL_DIFFUSERS_CONFIG)
    state = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
    assert {k: list(state[k].shape) for k in SDXL_KEYS} == SDXL_KEYS
    assert not [k for k in SDXL_ABSENT if k in state]
    assert ours.input_blocks[4][1].transformer_blocks[0].attn1.heads == 10  # num_head_channels 64
    assert ours.middle_block[1].transformer_blocks[0].attn2.heads == 20
    assert state_dict_mismatches(state, from_diffusers.state_dict()) == ""
    mapped = diffusers_unet_to_ldm(theirs.state_dict(), theirs.config)
    assert state_dict_mismatches(state, mapped) == ""
    # describe -> rebuild, and our config -> diffusers' config
    assert describe_unet(ours) == {k: v for k, v in kwargs.items() if k != "transformer_depth_middle"}
    back = diffusers_config_from_ldm(**kwargs)
    for key in ("attention_head_dim", "down_block_types", "up_block_types"):
        assert list(back[key]) == SDXL_DIFFUSERS_CONFIG[key]
    assert back["transformer_layers_per_block"][1:] == (2, 10)  # the first level's is unused (no attention)
    assert back["projection_class_embeddings_input_dim"] == 2816 and back["addition_time_embed_dim"] == 256


def test_sdxl_refiner_config_matches_diffusers_architecture():
    import diffusers

    kwargs = load_kwargs("sdxl_refiner")
    config = diffusers_config_from_ldm(**kwargs)
    assert config["attention_head_dim"] == [6, 12, 24, 24] and config["transformer_layers_per_block"] == 4
    assert config["down_block_types"] == (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    with torch.device("meta"):
        ours = UNetModel(**kwargs)
        theirs = diffusers.UNet2DConditionModel(**config)
    state = ours.state_dict()
    assert state_dict_mismatches(state, diffusers_unet_to_ldm(theirs.state_dict(), theirs.config)) == ""
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert list(state["label_emb.0.0.weight"].shape) == [1536, 2560]
    assert list(state["input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight"].shape) == [768, 1280]
    assert (
        "input_blocks.10.1.norm.weight" not in state
        and "middle_block.1.transformer_blocks.3.ff.net.2.bias" in state
    )
    with torch.device("meta"):
        rebuilt = UNetModel(**describe_unet(ours))
    assert state_dict_mismatches(state, rebuilt.state_dict()) == ""
