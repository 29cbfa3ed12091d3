"""The SDXL refiner as a base we load and sample from, against diffusers, on a tiny random
``StableDiffusionXLImg2ImgPipeline`` (``requires_aesthetics_score=True``) built here: one pooled bigG-like
text encoder (``text_encoder_2`` / ``tokenizer_2`` only), a text-time UNet whose label input is pooled + 5
Fourier features (original size, crop, aesthetic score), SDXL's VAE scale and scheduler.

Loaded through ``load_base_model`` from the saved diffusers folder and from a single file in sgm's refiner
layout (``conditioner.embedders.0.model.*``), our UNet, conditioning (context, pooled, aesthetic time ids for
prompt and negative prompt) and img2img images (DDIM, Euler) match the pipeline's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.diffusion import build_sampler
from ldm.io.diffusers_export import export_diffusers_folder
from ldm.io.sd_keys import SDXL_REFINER_PREFIX, detect_version
from ldm.io.single_file_export import export_components
from ldm.models.base_loader import latent_diffusion_from_components, load_base_model
from ldm.models.micro_conditions import negative_batch, sampling_batch
from ldm.modules.tiny_clip import tiny_clip_model, tiny_clip_tokenizer
from tests.interop_parts import close, perturb
from tests.sdxl_parts import LENGTH, POOLED, PROMPTS, SCHEDULER, TIME_DIM, WIDTH_G, tiny_xl_unet_vae

diffusers = pytest.importorskip("diffusers")

NEGATIVES = ["a blue square", "a black star on a yellow background"]
STEPS, GUIDANCE = 8, 5.0


def tiny_refiner_pipeline(folder):
    """A tiny ``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``, saved to ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    tokenizer, _ = tiny_clip_tokenizer(None, LENGTH)
    text_g = perturb(
        tiny_clip_model(tokenizer, WIDTH_G, 2, 4, LENGTH, seed=1, projection_dim=POOLED), 12, 0.02
    ).eval()
    unet, vae = tiny_xl_unet_vae(WIDTH_G, time_ids=5)  # pooled + original size, crop, score
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_g,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refiner") / "refiner"
    pipe = tiny_refiner_pipeline(folder)
    return folder, pipe


def time_ids(pipe, original, crop, score, negative_score):
    """The pipeline's (prompt, negative) ``add_time_ids`` for a batch of two."""
    ids, negative = pipe._get_add_time_ids(
        original, crop, original, score, negative_score, original, crop, original, torch.float32, POOLED
    )
    return ids.repeat(2, 1), negative.repeat(2, 1)


def fourier(pipe, ids):
    return pipe.unet.add_time_proj(ids.flatten()).reshape(len(ids), -1)


def test_refiner_folder_loads_with_equal_unet_and_conditioning(refiner):
    folder, pipe = refiner
    components = load_base_model(folder)
    assert components.refiner and components.text_encoder_2 is None
    assert components.unet.adm_in_channels == POOLED + 5 * TIME_DIM
    # the UNet on the same inputs, with the full label vector (pooled + 5 Fourier features)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    context, pooled = torch.randn(2, LENGTH, WIDTH_G, generator=g), torch.randn(2, POOLED, generator=g)
    ids = torch.tensor([[24.0, 20.0, 4.0, 2.0, 6.0], [16.0, 16.0, 0.0, 0.0, 2.5]])
    with torch.no_grad():
        theirs = pipe.unet(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        y = torch.cat([pooled, fourier(pipe, ids)], dim=-1)
        close(components.unet(x, t, context, y=y), theirs, 1e-5)
        # our conditioner against encode_prompt + _get_add_time_ids, prompt and negative prompt
        conditioner = components.conditioner()
        assert conditioner.input_keys == [
            "caption",
            "original_size_as_tuple",
            "crop_coords_top_left",
            "aesthetic_score",
        ]
        scores = {"original_size": (24, 20), "crop_top_left": (4, 2), "aesthetic_score": 7.0}
        scores["negative_aesthetic_score"] = 1.5
        batch = sampling_batch(conditioner.input_keys, PROMPTS, (16, 16), scores)
        ours = conditioner(batch, use_cache=False)
        ours_negative = conditioner(
            negative_batch(batch, NEGATIVES, scores), zero_empty=True, use_cache=False
        )
        context, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVES
        )
        ids, negative_ids = time_ids(pipe, (24, 20), (4, 2), 7.0, 1.5)
    close(ours["crossattn"], context, 1e-5)
    close(ours["vector"], torch.cat([pooled, fourier(pipe, ids)], dim=-1), 1e-5)
    close(ours_negative["crossattn"], negative, 1e-5)
    close(ours_negative["vector"], torch.cat([negative_pooled, fourier(pipe, negative_ids)], dim=-1), 1e-5)
    # the aesthetic score reaches the vector: prompt (7.0) and negative (1.5) differ in it alone
    assert (ours["vector"][:, -TIME_DIM:] - ours_negative["vector"][:, -TIME_DIM:]).abs().max() > 0.1


@pytest.mark.parametrize("name,scheduler", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_img2img_matches_the_refiner_pipeline(refiner, name, scheduler):
    folder, pipe = refiner
    model = latent_diffusion_from_components(load_base_model(folder), guidance_scale=GUIDANCE)
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    pipe.scheduler = getattr(diffusers, scheduler).from_config({**SCHEDULER, "clip_sample": False})
    with torch.no_grad():
        init_latents = pipe.vae.encode(init).latent_dist.mean * pipe.vae.config.scaling_factor
    options = {"original_size": (24, 20), "crop_top_left": (4, 2)}
    expected = {}
    for output in ("latent", "pt"):
        expected[output] = pipe(
            PROMPTS,
            negative_prompt=NEGATIVES,
            image=init_latents,  # already latents: the pipeline skips its (sampling) VAE encode
            strength=0.5,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(42),  # the noise: ``noise`` above
            original_size=options["original_size"],
            crops_coords_top_left=options["crop_top_left"],
            # both branches take the same crop, as in sgm and diffusers' base pipeline (the img2img pipeline
            # alone gives the negative branch (0, 0) unless told)
            negative_crops_coords_top_left=options["crop_top_left"],
            aesthetic_score=7.0,
            negative_aesthetic_score=1.5,
            output_type=output,
        ).images

    def refine(sizes: dict):
        steps = []
        images = model.generate(
            PROMPTS,
            negative_prompt=NEGATIVES,
            sampler=build_sampler(name, steps=STEPS),
            latents=noise,
            init_images=init,
            strength=0.5,
            callback=lambda s: steps.append(s["x"]),
            sizes=sizes,
        )
        return steps, images

    steps, images = refine({**options, "aesthetic_score": 7.0, "negative_aesthetic_score": 1.5})
    assert len(steps) == STEPS // 2
    close(steps[-1], expected["latent"], 1e-4)
    close((images / 2 + 0.5).clamp(0, 1), expected["pt"], 1e-4)
    # the default scores (6.0 / 2.5) give other latents: the score options reach the UNet
    steps, _ = refine(options)
    assert (steps[-1] - expected["latent"]).abs().max() > 1e-3


def test_refiner_single_file_round_trip_and_family_guards(refiner, tmp_path):
    from safetensors.torch import load_file

    folder, _ = refiner
    components = load_base_model(folder)
    path = export_components(components, tmp_path / "refiner.safetensors", dtype=torch.float32)
    state = load_file(str(path))
    assert detect_version(state) == "sdxl_refiner"
    assert any(k.startswith(SDXL_REFINER_PREFIX) for k in state)
    assert not any(k.startswith(("conditioner.embedders.1.", "cond_stage_model.")) for k in state)
    back = load_base_model(path)
    assert back.refiner and back.text_encoder_2 is None
    with pytest.raises(ValueError, match=r"refiner is written as a single file only"):
        export_diffusers_folder(back, tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
    for ours, theirs in ((back.unet, components.unet), (back.text_encoder, components.text_encoder)):
        for (key, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), key
    batch = sampling_batch(back.conditioner().input_keys, PROMPTS, (16, 16))
    assert float(batch["aesthetic_score"][0, 0]) == 6.0
    with torch.no_grad():
        close(back.conditioner()(batch)["vector"], components.conditioner()(batch)["vector"], 1e-6)
    # strict: an extra or a missing key still stops the load
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as opened:
        metadata = opened.metadata()
    extra = {**state, SDXL_REFINER_PREFIX + "unknown.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata)
    with pytest.raises(ValueError, match=r"unknown\.weight"):
        load_base_model(tmp_path / "extra.safetensors")
    missing = {k: v for k, v in state.items() if not k.endswith("ln_final.weight")}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata)
    with pytest.raises(ValueError, match=r"missing.*final_layer_norm\.weight"):
        load_base_model(tmp_path / "missing.safetensors")
    # a refiner read as another family: one error naming the preset that fits
    with pytest.raises(ValueError, match=r"is an SDXL refiner file.*preset 'v1'.*use preset 'sdxl_refiner'"):
        load_base_model(path, preset="v1")
    with pytest.raises(ValueError, match=r"is an SDXL refiner file.*SDXL base architecture"):
        load_base_model(path, preset="sdxl")


def test_inconsistent_refiner_folder_is_one_clear_error(refiner, tmp_path):
    folder, _ = refiner
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["requires_aesthetics_score"] = False
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"requires_aesthetics_score.*SDXL refiner has text_encoder_2 alone"):
        load_base_model(broken)


REFINER_REAL_KEYS = {  # names and shapes in the released sd_xl_refiner_1.0.safetensors
    "model.diffusion_model.label_emb.0.0.weight": [1536, 2560],
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight": [768, 1280],
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight": [1536, 1280],
    "model.diffusion_model.middle_block.1.transformer_blocks.3.attn2.to_k.weight": [1536, 1280],
    "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight": [3840, 1280],
    "conditioner.embedders.0.model.text_projection": [1280, 1280],
    "conditioner.embedders.0.model.ln_final.weight": [1280],
}


def test_released_refiner_layout_matches_the_preset_and_is_detected():
    from ldm.io.sd_layout import released_layout
    from ldm.io.sd_presets import PRESETS, version_of

    state = released_layout("sdxl_refiner")  # meta tensors: nothing allocated
    for key, shape in REFINER_REAL_KEYS.items():
        assert list(state[key].shape) == shape, key
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in state  # no attention at level 0
    assert detect_version(state) == "sdxl_refiner"
    preset = PRESETS["sdxl_refiner"]
    assert version_of(preset["unet"], preset["text_encoder"]) == "sdxl_refiner"
    assert version_of(PRESETS["sdxl"]["unet"], PRESETS["sdxl"]["text_encoder"]) == "sdxl"


def test_sample_py_refines_txt2img_and_img2img_with_aesthetic_scores(refiner, tmp_path):
    import numpy as np
    from PIL import Image

    import sample
    from tests.sdxl_parts import tiny_xl_pipeline

    folder, _ = refiner
    path = export_components(load_base_model(folder), tmp_path / "refiner.safetensors", dtype=torch.float32)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        tmp_path / "base.png"
    )
    common = ["--prompt", "a red circle", "--n", "1", "--steps", "4", "--sampler", "ddim", "--device", "cpu"]
    img2img = ["--init-image", str(tmp_path / "base.png"), "--strength", "0.5"]

    def ckpt_args(ckpt, name) -> list[str]:
        return ["--ckpt", str(ckpt), *common, "--out", str(tmp_path / name)]

    def image(ckpt, name, *extra) -> np.ndarray:
        out = tmp_path / name
        sample.main([*ckpt_args(ckpt, name), *extra])
        return np.asarray(Image.open(next(out.glob("000_*.png"))), dtype=np.int16)

    plain = image(folder, "txt2img")
    refined = image(folder, "img2img", *img2img)
    assert np.array_equal(image(path, "img2img_file", *img2img), refined)  # the single file: same image
    scored = image(folder, "scored", *img2img, "--aesthetic-score", "9", "--negative-aesthetic-score", "1")
    assert np.abs(refined - plain).max() > 0 and np.abs(scored - refined).max() > 0
    # a condition the model does not read: one line naming the flag (run_main prints it as "error: ...")
    with pytest.raises(ValueError, match=r"^--target-size: .* does not take this condition.*leave it out"):
        sample.main([*ckpt_args(folder, "x"), "--target-size", "16", "16"])
    base = tmp_path / "base"
    tiny_xl_pipeline(base)
    with pytest.raises(ValueError, match=r"^--aesthetic-score: .*the SDXL refiner's"):
        sample.main([*ckpt_args(base, "y"), "--aesthetic-score", "7"])


def test_finetuning_a_refiner_is_one_clear_error(refiner, compose_cfg):
    from hydra.utils import instantiate

    folder, _ = refiner
    cfg = compose_cfg(["experiment=lora_finetune", "model/method=full", f"model.base={folder}"])
    model = instantiate(cfg.model)
    with pytest.raises(ValueError, match=r"is an SDXL refiner.*fine-tune the SDXL base \(lora_sdxl"):
        model.prepare(str(folder))
