"""Fine-tuning on an SDXL base (two text encoders, the second pooled; size conditions): the *_sdxl presets on
a tiny SDXL base that is our own txt2img_sdxl checkpoint -- LoRA on the UNet and both text encoders written as
kohya (lora_unet_ / lora_te1_ / lora_te2_) and diffusers files and read back by sampling to the same images,
textual inversion's {"clip_l", "clip_g"} file read back, exact resume of an SDXL LoRA run, and the clear
errors for files and bases of the other family."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning import Callback
from safetensors import safe_open

from ldm.io.sdxl_embeddings import apply_any_embedding
from ldm.models.base_loader import load_base_model
from ldm.models.finetune.fallback import tiny_random_base
from ldm.models.finetune.text_parts import SIZE_KEYS, check_family, fill_size_conditions
from ldm.models.pipeline import load_for_sampling
from ldm.modules.conditioner import Conditioner
from ldm.modules.vae import AutoencoderKL
from tests.conftest import add_training_callback, captioned_image_folder, compose_train
from tests.test_buckets import MIXED_SIZES, make_mixed_folder
from tests.test_resume_exact import KILL_STEP, QUIET, SCHEDULE, max_difference, run_cli
from tests.test_sample_cli import convert_main
from train import train

PARTS = ["model/sampler=ddim", "model.sampler.steps=2", *QUIET]


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    """Our txt2img_sdxl checkpoint (tiny SDXL layout) trained for a few steps on a hand-made VAE."""
    tmp = tmp_path_factory.mktemp("sdxl_base")
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp / "vae.ckpt")
    cfg = compose_train(
        tmp,
        [
            "experiment=txt2img_sdxl",
            "model/vae=tiny",
            *PARTS,
            "debug=smoke",
            "data.train_size=16",
            "data.val_size=4",
            "data.batch_size=4",
            f"model.vae_ckpt={tmp / 'vae.ckpt'}",
            "model.log_prompts=[a red circle on a blue background]",
        ],
    )
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def folder_overrides(experiment: str, base: Path, *extra: str) -> list[str]:
    return [
        f"experiment={experiment}",
        *PARTS,
        f"model.base={base}",
        f"data.source.root={captioned_image_folder()}",
        "data.source.resolution=32",
        "data.cache_dir=null",
        "data.repeats=2",
        "data.batch_size=2",
        "model.log_prompts=[a red star]",
        "trainer.max_steps=2",
        "debug=smoke",
        *extra,
    ]


def run(tmp_path: Path, args: list[str], name: str = "run"):
    cfg = compose_train(tmp_path, args, output_name=name)
    _, objects = train(cfg)
    return objects["model"], Path(cfg.paths.output_dir)


def perturb_method(model, std: float = 0.2) -> None:
    """LoRA up weights start at zero: give every trained tensor a seeded value so the file matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)


LAYOUT_ALGOS = [("kohya", "lora"), ("peft", "lora"), ("kohya", "loha"), ("kohya", "lokr"), ("peft", "dora")]
MARKERS = {
    "lora": "weight",
    "loha": "hada_w1_a",
    "lokr": "lokr_w1",
    "dora": "lora_magnitude_vector",
}


@pytest.mark.parametrize("layout,algo", LAYOUT_ALGOS)
def test_sdxl_lora_on_unet_and_both_text_encoders_reads_back_to_the_same_images(
    tmp_path, sdxl_base, layout, algo
):
    """Every algorithm (model.method.algo) on SDXL: the file sample.py --lora reads and convert.py --lora
    bakes gives the trained model's conditions and UNet output."""
    model, _ = run(
        tmp_path,
        folder_overrides(
            "lora_sdxl",
            sdxl_base,
            "model.method.text_encoder_targets=[TEXT_ENCODER]",
            "model.offload_text_encoder=false",
            f"model.method.export_format={layout}",
            "model.method.rank=4",
            f"model.method.algo={algo}",
            "model.method.factor=4",
        ),
    )
    perturb_method(model, 0.05 if algo == "loha" else 0.2)  # LoHa's delta is a product of four factors
    path = model.export(tmp_path / "sdxl_lora.safetensors")
    with safe_open(path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_") if layout == "kohya" else ("unet.", "text_encoder.")
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    if layout == "kohya":
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # sgm module names, as kohya's SDXL
        module = "networks.lora" if algo == "lora" else "lycoris.kohya"
        assert metadata["ss_network_module"] == module
    else:
        assert any(k.startswith("text_encoder_2.") for k in keys)
    assert any(k.startswith(("lora_te2_", "text_encoder_2.")) and k.endswith(MARKERS[algo]) for k in keys)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    model.eval()
    sampled = load_for_sampling(str(sdxl_base), loras=[str(path)])
    plain = load_for_sampling(str(sdxl_base))
    baked = convert_main()(
        [
            "--base",
            str(sdxl_base),
            "--lora",
            str(path),
            "--out",
            str(tmp_path / "baked.safetensors"),
            "--fp32",
        ]
    )
    baked = load_for_sampling(str(baked))
    ours, theirs, base, merged = (denoise(m) for m in (model, sampled, plain, baked))
    for key in ours:  # text encoders (context, pooled vector) and the UNet's output
        same, changed = (ours[key] - theirs[key]).abs().max(), (ours[key] - base[key]).abs().max()
        assert same <= 2e-5, key  # merged into the weights vs a LoRA layer: float32 rounding only
        assert changed > 10 * same, key  # the file matters
        assert (merged[key] - theirs[key]).abs().max() <= 2e-5, key  # convert.py --lora bakes the same


def denoise(model) -> dict[str, torch.Tensor]:
    """The conditions of one prompt and the UNet's output on a fixed noisy latent under them."""
    with torch.no_grad():
        cond = model.conditions({**size_batch(), "caption": ["a red star"]})
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ema = getattr(model, "unet_ema", None)  # sampling merges the file into the EMA UNet when there is one
        unet = ema.module if ema is not None and not hasattr(model, "method") else model.unet
        out = unet(x, torch.tensor([500]), context=cond["crossattn"], y=cond["vector"])
    return {"context": cond["crossattn"], "vector": cond["vector"], "unet": out}


def test_lora_of_the_other_family_is_one_clear_error(tmp_path, sdxl_base):
    from ldm.io.kohya_lora import save_kohya_lora
    from ldm.io.lora_any import load_lora
    from ldm.modules.adapters.lora import inject_lora

    sd = tiny_random_base(32, "sd")
    inject_lora(sd.unet, ["*attn1.to_q"], rank=2)
    sd1_file = save_kohya_lora(tmp_path / "sd1.safetensors", unet=sd.unet)
    xl = tiny_random_base(32, "sdxl")
    with pytest.raises(ValueError, match="SD 1.x/2.x LoRA.*this base is SDXL"):
        load_lora(sd1_file, unet=xl.unet, text_encoders=xl.text_encoders, merge=True)

    model, _ = run(tmp_path, folder_overrides("lora_sdxl", sdxl_base))
    xl_file = model.export(tmp_path / "xl.safetensors")
    fresh = tiny_random_base(32, "sd")
    with pytest.raises(ValueError, match="is an SDXL LoRA.*SD 1.x/2.x model"):
        load_lora(xl_file, unet=fresh.unet, text_encoder=fresh.text_encoder, merge=True)


def test_sdxl_textual_inversion_writes_clip_l_and_clip_g_and_reads_back(tmp_path, sdxl_base):
    model, _ = run(
        tmp_path,
        folder_overrides(
            "textual_inversion_sdxl",
            sdxl_base,
            'model.method.placeholder="<toy>"',
            "model.method.initializer_word=toy",
            "model.log_prompts=['a <toy>']",
            "trainer.accumulate_grad_batches=1",
        ),
    )
    perturb_method(model)
    path = model.export(tmp_path / "toy.safetensors")
    with safe_open(path, "pt") as handle:
        shapes = {k: tuple(handle.get_tensor(k).shape) for k in handle.keys()}  # noqa: SIM118 - a safe_open handle
    assert shapes == {"clip_l": (1, 32), "clip_g": (1, 48)}  # one vector per encoder, each its width

    sampled = load_for_sampling(str(sdxl_base), embeddings=[str(path)])
    with torch.no_grad():
        ours = model.conditions({**size_batch(), "caption": ["a <toy> on a table"]})
        theirs = sampled.conditions({**size_batch(), "caption": ["a <toy> on a table"]})
    assert (ours["crossattn"] - theirs["crossattn"]).abs().max() < 1e-5
    assert (ours["vector"] - theirs["vector"]).abs().max() < 1e-5

    sd = tiny_random_base(32, "sd")  # the other family / a wrong width: one clear error each
    with pytest.raises(ValueError, match="is an SDXL embedding.*one text encoder"):
        apply_any_embedding([sd.text_encoder], str(path))
    sd1_file = tmp_path / "sd1.safetensors"
    from ldm.io.embeddings import save_embedding

    save_embedding(sd1_file, torch.zeros(1, 64), "<x>")
    xl = tiny_random_base(32, "sdxl")
    with pytest.raises(ValueError, match="not an SDXL embedding"):
        apply_any_embedding(xl.text_encoders, str(sd1_file))
    from ldm.io.sdxl_embeddings import save_sdxl_embedding

    wide = save_sdxl_embedding(
        tmp_path / "wide.safetensors", [torch.zeros(1, 768), torch.zeros(1, 1280)], "<w>"
    )
    with pytest.raises(ValueError, match="clip_l is 768 wide.*\\[32, 48\\]"):
        apply_any_embedding(xl.text_encoders, str(wide))


def test_sdxl_textual_inversion_as_an_a1111_pt_holds_the_clip_l_clip_g_dict(tmp_path, sdxl_base):
    """export_format=a1111_pt on SDXL: a .pt of {"clip_l", "clip_g"} tensors only (AUTOMATIC1111's embedding
    loader takes such a dict as an SDXL embedding and detaches every value), read back by sample.py
    --embedding (the token: the file name, A1111's rule, or file:token)."""
    model, _ = run(
        tmp_path,
        folder_overrides(
            "textual_inversion_sdxl",
            sdxl_base,
            'model.method.placeholder="<toy>"',
            "model.method.initializer_word=toy",
            "model.method.export_format=a1111_pt",
            "model.log_prompts=['a <toy>']",
            "trainer.accumulate_grad_batches=1",
        ),
    )
    perturb_method(model)
    path = model.export(tmp_path / "toy.safetensors")
    assert path.suffix == ".pt"
    payload = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in payload.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    sampled = load_for_sampling(str(sdxl_base), embeddings=[f"{path}:<toy>"])
    batch = {**size_batch(), "caption": ["a <toy> on a table"]}
    with torch.no_grad():
        ours, theirs = model.conditions(batch), sampled.conditions(batch)
    assert (ours["crossattn"] - theirs["crossattn"]).abs().max() < 1e-5
    assert apply_any_embedding(tiny_random_base(32, "sdxl").text_encoders, str(path)).token == "toy"


def test_sdxl_pivotal_tuning_bundles_clip_l_and_clip_g_and_sampling_adds_both(tmp_path, sdxl_base):
    """pivotal_tuning_sdxl: the kohya SDXL LoRA bundles the token as bundle_emb.<token>.clip_l / .clip_g (the
    dict AUTOMATIC1111's embedding loader takes for SDXL), the embedding is also written alone, and
    ``sample.py --lora`` (load_for_sampling) adds both encoders' vectors: the same conditions as training."""
    from ldm.io.bundled_embeddings import apply_bundled_embeddings, read_bundled_embeddings

    model, _ = run(
        tmp_path,
        folder_overrides(
            "pivotal_tuning_sdxl",
            sdxl_base,
            'model.method.textual_inversion.placeholder="<toy>"',
            "model.method.textual_inversion.initializer_word=toy",
            "model.method.lora.rank=4",
            "model.log_prompts=['a <toy>']",
        ),
    )
    perturb_method(model)
    path = model.export(tmp_path / "pivotal.safetensors")
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        bundled = {k: tuple(handle.get_tensor(k).shape) for k in keys if k.startswith("bundle_emb.")}
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert bundled == {"bundle_emb.<toy>.clip_l": (2, 32), "bundle_emb.<toy>.clip_g": (2, 48)}
    a1111 = {}  # AUTOMATIC1111's rule: bundle_emb.<name>.<rest> -> {name: {rest: tensor}}
    for key in bundled:
        name, rest = key.split(".", 2)[1:]
        a1111.setdefault(name, {})[rest] = key
    assert set(a1111) == {"<toy>"} and {"clip_l", "clip_g"} <= set(a1111["<toy>"])  # its SDXL embedding test
    with safe_open(tmp_path / "pivotal_emb.safetensors", "pt") as handle:
        assert set(handle.keys()) == {"clip_l", "clip_g"}

    model.eval()
    sampled = load_for_sampling(str(sdxl_base), loras=[str(path)])
    batch = {**size_batch(), "caption": ["a <toy> on a table"]}
    with torch.no_grad():
        ours, theirs = model.conditions(batch), sampled.conditions(batch)
    with torch.no_grad():  # the LoRA is on the UNet only: the conditions differ from the base's by the token
        plain = load_for_sampling(str(sdxl_base)).conditions(batch)
    for key in ("crossattn", "vector"):
        assert (ours[key] - theirs[key]).abs().max() <= 2e-5, key
        assert (ours[key] - plain[key]).abs().max() > 1e-3, key
    assert [tuple(v.shape) for v in read_bundled_embeddings(path)["<toy>"]] == [(2, 32), (2, 48)]
    # convert.py --lora bakes the LoRA and writes the bundled token beside the model file
    baked = convert_main()(
        ["--base", str(sdxl_base), "--lora", str(path), "--out", str(tmp_path / "m.safetensors")]
    )
    assert (tmp_path / "m_toy.safetensors").is_file()
    baked = load_for_sampling(str(baked), embeddings=[str(tmp_path / "m_toy.safetensors")])
    with torch.no_grad():
        assert (baked.conditions(batch)["crossattn"] - ours["crossattn"]).abs().max() <= 1e-3  # fp16 file

    sd = tiny_random_base(32, "sd")  # an SDXL bundle on a one-encoder base, and the reverse: one clear error
    with pytest.raises(ValueError, match="bundles '<toy>' as an SDXL embedding.*\\[64\\] wide"):
        apply_bundled_embeddings([sd.text_encoder], path)
    from ldm.io.bundled_embeddings import add_bundled_embeddings

    sd1_bundle = tmp_path / "sd1_bundle.safetensors"
    sd1_bundle.write_bytes(path.read_bytes())
    add_bundled_embeddings(sd1_bundle, {"<x>": torch.zeros(1, 64)})
    xl = tiny_random_base(32, "sdxl")
    with pytest.raises(ValueError, match="bundles '<x>' as an SD 1.x/2.x embedding.*\\[32, 48\\] wide"):
        apply_bundled_embeddings(xl.text_encoders, sd1_bundle)


def size_batch(n: int = 1) -> dict:
    return {
        "original_size_as_tuple": torch.tensor([[32, 32]] * n),
        "crop_coords_top_left": torch.tensor([[0, 0]] * n),
        "target_size_as_tuple": torch.tensor([[32, 32]] * n),
    }


def test_a_base_of_the_other_family_is_one_clear_error():
    sd, xl = tiny_random_base(32, "sd"), tiny_random_base(32, "sdxl")
    with pytest.raises(ValueError, match="is an SD 1.x/2.x model.*model.base_family=sdxl"):
        check_family(Conditioner([sd.text_encoder]), "sdxl", "v1-5.safetensors")
    with pytest.raises(ValueError, match="is an SDXL model.*lora_sdxl"):
        check_family(xl.conditioner(), "sd", "sd_xl_base_1.0.safetensors")
    check_family(xl.conditioner(), "sdxl", "x")  # the right family passes


def test_sdxl_full_finetune_exports_the_unet_in_the_single_file_layout(tmp_path, sdxl_base):
    model, _ = run(
        tmp_path,
        folder_overrides(
            "lora_sdxl", sdxl_base, "model/method=full", "~model.method.rank", "~model.method.alpha"
        ),
    )
    path = model.export(tmp_path / "full.safetensors")
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        weight = handle.get_tensor("model.diffusion_model.out.2.weight")
    # a whole SDXL single file: sgm's layout, bigG in OpenCLIP's names
    for prefix in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert torch.allclose(weight.float(), model.unet.out[2].weight.detach().half().float())
    loaded = load_base_model(str(path))  # and it loads back as an SDXL base with the fine-tuned UNet
    assert loaded.text_encoder_2 is not None
    assert torch.equal(loaded.unet.out[2].weight.half(), model.unet.out[2].weight.detach().half())


def test_sdxl_lora_resumes_exactly_after_a_kill(tmp_path, sdxl_base):
    args = [
        "experiment=lora_sdxl",
        *PARTS,
        *SCHEDULE,
        f"model.base={sdxl_base}",
        f"data.source.root={captioned_image_folder()}",
        "data.source.resolution=32",
        "data.repeats=4",  # 6 images x 4 = 24 items: 5 batches of 4 per epoch
        "data.cache_dir=null",
        "model.method.text_encoder_targets=[TEXT_ENCODER]",
        "model.offload_text_encoder=false",
        "model.log_prompts=[a red star]",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", KILL_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = next((tmp_path / "logs").glob("*/runs/*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 8

    resumed = compose_train(tmp_path, [*args, "ckpt_path=last"], output_name="resumed")
    _, objects = train(resumed)
    straight, straight_objects = run(tmp_path, args, "straight")
    assert objects["trainer"].global_step == straight_objects_step(straight_objects) == 10
    theirs = objects["model"].method.state_dict()
    assert any(k.startswith("text_encoder_2.") for k in theirs)
    assert max_difference(theirs, straight.method.state_dict()) <= 1e-6


def straight_objects_step(output_dir: Path) -> int:
    return torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


class RecordSizes(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: batch[k].clone() for k in SIZE_KEYS} | {"latent": batch["latent_mean"].shape})


def test_size_conditions_of_the_crops_taken_reach_the_batches_through_the_latent_cache(
    tmp_path, sdxl_base, monkeypatch
):
    recorder = RecordSizes()
    add_training_callback(monkeypatch, recorder)
    folder = make_mixed_folder(tmp_path / "concept", MIXED_SIZES)
    args = [
        *folder_overrides("lora_sdxl", sdxl_base, "model.offload_text_encoder=false"),
        f"data.source.root={folder}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.repeats=1",
        "data.batch_size=1",
        "trainer.max_steps=8",
        "trainer.limit_train_batches=8",
    ]
    cfg = compose_train(tmp_path, args)
    _, objects = train(cfg)
    dm, model = objects["datamodule"], objects["model"]
    source = dm.source.data_train
    expected = [source[i] for i in range(len(source))]  # the bucketed dataset's own sizes per image
    for i, item in enumerate(expected):  # the cache holds each image's sizes beside its latent
        for key in SIZE_KEYS:
            assert dm.cached.sizes[key][i].tolist() == item[key].tolist(), (i, key)
    originals = {tuple(item["original_size_as_tuple"].tolist()) for item in expected}
    assert originals == {(h, w) for w, h in MIXED_SIZES}  # the files' sizes, not the bucket's
    factor = model.vae.downsample_factor
    assert len(recorder.batches) == objects["trainer"].global_step >= 4
    for batch in recorder.batches:  # every batch carries them, its target the size of its latent
        target = batch["target_size_as_tuple"][0].tolist()
        assert target == [side * factor for side in batch["latent"][-2:]]
        assert tuple(batch["original_size_as_tuple"][0].tolist()) in originals
    assert any(batch["crop_coords_top_left"].abs().sum() > 0 for batch in recorder.batches)

    again = instantiate(cfg.data, _convert_="all")  # the disk cache gives them back without encoding
    again.setup("fit")
    again.cache_latents(lambda images: pytest.fail("encoded again"), model.data_services().vae_fingerprint())
    for key in SIZE_KEYS:
        assert torch.equal(again.cached.sizes[key], dm.cached.sizes[key])


def test_batches_without_size_conditions_get_the_sampling_defaults():
    batch = {"caption": ["a", "b"]}
    filled = fill_size_conditions(batch, ["caption", *SIZE_KEYS], (48, 64))
    assert filled["original_size_as_tuple"].tolist() == [[48, 64]] * 2
    assert filled["target_size_as_tuple"].tolist() == [[48, 64]] * 2
    assert filled["crop_coords_top_left"].tolist() == [[0, 0]] * 2


def test_fast_dev_run_of_an_sdxl_preset_without_a_base_stands_in_a_tiny_sdxl_one(compose_cfg):
    from tests.test_train import tiny_overrides

    _, objects = train(compose_cfg([*tiny_overrides("lora_sdxl"), "debug=fdr"]))
    model = objects["model"]
    assert len(model.conditioner.text_embedders) == 2 and model.unet.adm_in_channels == 232
    assert {k.split(".")[0] for k in model.method.state_dict()} == {"unet"}


def test_sdxl_hypernetwork_keys_the_context_width_and_reads_back(tmp_path, sdxl_base):
    from ldm.io.hypernetwork_file import load_hypernetwork

    model, _ = run(
        tmp_path, folder_overrides("hypernetwork_sdxl", sdxl_base, "model.offload_text_encoder=false")
    )
    perturb_method(model)
    path = model.export(tmp_path / "style.pt")
    net, _ = load_hypernetwork(path)
    assert list(net.widths) == [80]  # SDXL's context width (tiny: 32 + 48; the real one 768 + 1280 = 2048)
    model.eval()
    sampled = load_for_sampling(str(sdxl_base), hypernetwork=str(path))
    plain = load_for_sampling(str(sdxl_base))
    ours, theirs, base = (denoise(m) for m in (model, sampled, plain))
    same, changed = (ours["unet"] - theirs["unet"]).abs().max(), (ours["unet"] - base["unet"]).abs().max()
    assert changed > 100 * same, (same, changed)  # read back exactly, and the file matters


def attached(method):
    """``method`` attached to a tiny random SDXL base (as ``FineTuneModule.prepare`` does)."""
    from ldm.models.base_loader import latent_diffusion_from_components

    parts = tiny_random_base(32, "sdxl")
    model = latent_diffusion_from_components(parts)
    method.attach(model)
    return model


@pytest.mark.parametrize(
    "chosen,parts", [(None, {"text_encoder", "text_encoder_2"}), ([2], {"text_encoder_2"})]
)
def test_lora_text_encoder_targets_apply_to_the_chosen_text_encoders(chosen, parts):
    from ldm.models.finetune.lora import LoRA

    method = LoRA(rank=2, text_encoder_targets=["TEXT_ENCODER"], text_encoders=chosen)
    attached(method)
    assert {k.split(".")[0] for k in method.state_dict()} == {"unet", *parts}
    with pytest.raises(ValueError, match="has 2 text encoder"):
        attached(LoRA(rank=2, text_encoder_targets=["TEXT_ENCODER"], text_encoders=[3]))


def test_dreambooth_full_with_text_encoders_trains_and_exports_both(tmp_path):
    from ldm.models.finetune.full import FullUNet

    method = FullUNet(train_text_encoder=True, text_encoder_lr=1e-5)
    model = attached(method)
    assert [g["name"] for g in method.param_groups()] == ["unet", "text_encoder", "text_encoder_2"]
    assert all(p.requires_grad for e in model.conditioner.text_embedders for p in e.transformer.parameters())
    state = method.state_dict()
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    method.load_state_dict(state)  # what a resume does
    path = method.export(tmp_path / "db.safetensors", {"steps": 1})
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
    prefixes = (
        "model.diffusion_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    )
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix


def test_an_sdxl_finetune_checkpoint_samples_as_base_plus_method(tmp_path, sdxl_base):
    model, run_dir = run(
        tmp_path,
        folder_overrides(
            "lora_sdxl",
            sdxl_base,
            "model.method.text_encoder_targets=[TEXT_ENCODER]",
            "model.offload_text_encoder=false",
        ),
    )
    rebuilt = load_for_sampling(str(run_dir / "checkpoints" / "last.ckpt"))  # sample.py --ckpt <last.ckpt>
    assert len(rebuilt.conditioner.text_embedders) == 2
    theirs = rebuilt.method.state_dict()
    assert any(k.startswith("text_encoder_2.") for k in theirs)
    assert max_difference(theirs, model.method.state_dict()) == 0
