"""The fine-tuning core with LoRA end to end at test size: base discovery (our checkpoint, SD single file,
diffusers folder), method-only training and checkpoints, exact resume, kohya export that loads back, latent
caching (memory and disk), regularisation flags, EMA of the method, before/after images."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from datamodules.finetune import FineTuneDataModule
from datamodules.image_folder import ImageFolderDataModule
from ldm.io.kohya_lora import load_kohya_lora
from ldm.io.safe_load import read_safetensors_metadata as read_kohya_metadata
from ldm.models.checkpoint import load_lightning_model
from ldm.modules.vae import AutoencoderKL
from train import train

TINY_PARTS = [
    "model/vae=tiny",
    "model/unet=tiny",
    "model/text_encoder=tiny",
    "model/sampler=ddim",
    "model.sampler.steps=2",
    "callbacks.rich_progress_bar=null",
]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny txt2img checkpoint trained for a few steps on a hand-made VAE checkpoint."""
    from tests.conftest import compose_train

    tmp = tmp_path_factory.mktemp("base")
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp / "vae.ckpt")
    cfg = compose_train(
        tmp,
        [
            "experiment=txt2img",
            *TINY_PARTS,
            "debug=smoke",
            "data.train_size=16",
            "data.val_size=4",
            f"model.vae_ckpt={tmp / 'vae.ckpt'}",
            "model.log_prompts=[a red circle on a blue background]",
        ],
    )
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


FINETUNE_PARTS = ["model/sampler=ddim", "model.sampler.steps=2", "callbacks.rich_progress_bar=null"]


def lora_overrides(base: Path, extra=()):
    return [
        "experiment=lora_finetune",
        *FINETUNE_PARTS,
        "debug=smoke",
        f"model.base={base}",
        "data.source.train_size=16",
        "data.source.val_size=4",
        "data.batch_size=4",
        "model.log_prompts=[a red star on a blue background]",
        *extra,
    ]


def test_lora_finetune_trains_only_the_adapter_and_exports_kohya(compose_cfg, base_ckpt, tmp_path):
    cfg = compose_cfg(lora_overrides(base_ckpt, [f"data.cache_dir={tmp_path / 'cache'}"]))
    _, objects = train(cfg)
    model, trainer = objects["model"], objects["trainer"]
    run = Path(cfg.paths.output_dir)

    # the base came from the txt2img checkpoint (EMA UNet), frozen; only LoRA params are trainable
    base = load_lightning_model(base_ckpt)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(model.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
    assert float(model.scale_factor) == pytest.approx(float(base.scale_factor))

    # latents were cached (in memory and on disk) and used for training
    assert trainer.datamodule.cached is not None
    assert list((tmp_path / "cache").glob("latents_*.pt"))

    # checkpoints hold exactly the method's state (+ the scale factor)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    method_state = model.method.state_dict()
    assert set(ckpt["state_dict"]) == {f"method.{k}" for k in method_state} | {"scale_factor"}
    assert all("lora_" in k or k.endswith(".alpha") for k in method_state)
    full_size = sum(v.numel() for v in base.state_dict().values())
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.2 * full_size

    # the exported kohya file loads back into a fresh copy of the base and reproduces the LoRA UNet
    exported = run / "adapters" / "lora_finetune.safetensors"
    assert exported.is_file()
    meta = read_kohya_metadata(exported)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_module"] == "networks.lora"
    fresh = load_lightning_model(base_ckpt).unet_ema.module
    summary = load_kohya_lora(exported, unet=fresh)
    assert summary["modules"] > 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx = torch.randn(2, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, ctx), model.unet(x, t, ctx), atol=1e-5, rtol=1e-4)

    # before/after grids
    images = run / "images"
    assert list(images.glob("samples_*.png")) and list(images.glob("base_samples_*.png"))


def test_lora_resume_restores_the_method_state(compose_cfg, base_ckpt, monkeypatch):
    from tests.conftest import add_training_callback

    seen_steps = []  # steps actually trained: a fresh (not resumed) run would start again at 0

    class Record(Callback):
        def on_train_batch_start(self, trainer, *args):
            seen_steps.append(trainer.global_step)

    add_training_callback(monkeypatch, Record())
    first = compose_cfg(
        lora_overrides(
            base_ckpt, ["data.cache_dir=null", "trainer.max_steps=2", "trainer.val_check_interval=2"]
        ),
        output_name="a",
    )
    train(first)
    saved = torch.load(Path(first.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and seen_steps == [0, 1]
    seen_steps.clear()
    # resuming at the saved step trains nothing more: the method's weights are the checkpoint's, exactly
    same = compose_cfg(
        lora_overrides(base_ckpt, ["data.cache_dir=null", "trainer.max_steps=2", "ckpt_path=last"]),
        output_name="b",
    )
    from tests.test_dreambooth import save_run_config  # (a module importing this one)

    # as `python train.py` leaves it: ckpt_path=last below skips this resume (no new checkpoint)
    save_run_config(same)
    _, objects = train(same)
    state = objects["model"].method.state_dict()
    assert objects["trainer"].global_step == 2 and seen_steps == []
    for key, value in state.items():
        torch.testing.assert_close(value, saved["state_dict"][f"method.{key}"], rtol=0, atol=0)
    # trained, not fresh zeros
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_up" in k)
    # and continues to the new max_steps
    more = compose_cfg(
        lora_overrides(
            base_ckpt,
            ["data.cache_dir=null", "trainer.max_steps=4", "trainer.max_epochs=-1", "ckpt_path=last"],
        ),
        output_name="c",
    )
    _, objects = train(more)
    assert objects["trainer"].global_step == 4 and seen_steps == [2, 3]


def test_fine_tune_checkpoint_rebuilds_for_sampling(compose_cfg, base_ckpt):
    """load_lightning_model (sample.py --ckpt) rebuilds a fine-tune from its base + method state."""
    cfg = compose_cfg(lora_overrides(base_ckpt, ["data.cache_dir=null"]))
    train(cfg)
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(path, weights_only=True)["state_dict"]
    rebuilt = load_lightning_model(path)
    assert rebuilt.base_source == str(base_ckpt)
    for key, value in rebuilt.method.state_dict().items():
        torch.testing.assert_close(value, saved[f"method.{key}"], rtol=0, atol=0)
    prompt = ["a red star on a blue background"]
    with_lora = rebuilt.generate(prompt, seed=3)
    torch.testing.assert_close(rebuilt.generate(prompt, seed=3), with_lora)
    with rebuilt.method.disabled():
        assert not torch.equal(rebuilt.generate(prompt, seed=3), with_lora)


def test_missing_base_is_a_clear_error(compose_cfg):
    cfg = compose_cfg(
        [
            "experiment=lora_finetune",
            *FINETUNE_PARTS,
            "debug=smoke",
            "data.cache_dir=null",
            "data.source.train_size=8",
            "data.source.val_size=4",
        ]
    )
    with pytest.raises(FileNotFoundError, match="experiment=txt2img"):
        train(cfg)


def test_fast_dev_run_without_base_uses_the_tiny_preset_base(compose_cfg):
    cfg = compose_cfg(
        [
            "experiment=lora_finetune",
            *FINETUNE_PARTS,
            "debug=fdr",
            "data.cache_dir=null",
            "data.source.train_size=8",
            "data.source.val_size=4",
            "data.batch_size=4",
        ]
    )
    _, objects = train(cfg)
    model = objects["model"]
    assert model.base_source is None and model.unet.context_dim == 64 and model.vae.downsample_factor == 4
    assert model.method.parameters()


def test_unet_settings_apply_to_the_loaded_base_or_fail(compose_cfg, base_ckpt):
    with pytest.raises(Exception, match="unet"):
        compose_cfg(lora_overrides(base_ckpt, ["model.unet.use_checkpoint=true"]))
    cfg = compose_cfg(lora_overrides(base_ckpt, ["data.cache_dir=null", "model.gradient_checkpointing=true"]))
    _, objects = train(cfg)
    blocks = [m for m in objects["model"].unet.modules() if hasattr(m, "use_checkpoint")]
    assert blocks and all(m.use_checkpoint for m in blocks)


def test_ema_of_the_method_is_built_after_attach_and_checkpointed(compose_cfg, base_ckpt):
    cfg = compose_cfg(
        lora_overrides(base_ckpt, ["data.cache_dir=null", "model.ema_decay=0.5", "model.ema_device=cpu"])
    )
    _, objects = train(cfg)
    model = objects["model"]
    params = model.method.parameters()
    assert model.method_ema is not None and model.method_ema.count == len(params)
    assert model.method_ema.num_updates == 4
    live = [p.detach().clone() for p in params]
    with model.ema_scope():  # the average is swapped in, then the live weights come back
        assert any(not torch.equal(p, q) for p, q in zip(params, live))
    assert all(torch.equal(p, q) for p, q in zip(params, live))
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("method_ema.shadow_") for k in ckpt["state_dict"])


def test_diffusers_folder_as_base_through_train_py(compose_cfg, tmp_path):
    folder = tiny_diffusers_folder(tmp_path / "tiny-diffusers")
    cfg = compose_cfg(lora_overrides(folder, ["data.cache_dir=null"]))
    _, objects = train(cfg)
    model = objects["model"]
    assert model.base_source == str(folder) and objects["trainer"].global_step == 4
    assert (Path(cfg.paths.output_dir) / "adapters" / "lora_finetune.safetensors").is_file()


def tiny_diffusers_folder(folder: Path) -> Path:
    """A tiny random SD-style diffusers folder (UNet 2 levels, f=4 VAE, tiny CLIP) written by diffusers."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.modules.text_encoder import CLIPTextEncoder

    CLIPTextEncoder.tiny(hidden_size=32, num_layers=1, num_heads=2).save_pretrained(
        folder / "clip", layout="diffusers"
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = DAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(folder / "clip" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "clip" / "tokenizer"),
        unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def test_latent_cache_refuses_random_augmentation(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(tmp_path / f"{i}.png")
    source = ImageFolderDataModule(root=str(tmp_path), resolution=32, random_flip=0.5, val_size=1)
    dm = FineTuneDataModule(source, resolution=32, cache_latents=True)
    with pytest.raises(ValueError, match="random_flip"):
        dm.setup("fit")


def test_latent_cache_flip_variants(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 32))  # left half white
    img.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("half")
    source = ImageFolderDataModule(root=str(tmp_path), resolution=32, random_flip=0.0, val_size=0)
    dm = FineTuneDataModule(source, resolution=32, cache_latents=True, flip_variants=True)
    dm.setup("fit")
    dm.cache_latents(lambda x: (x.mean(1, keepdim=True), torch.ones_like(x[:, :1])), "identity")
    means = dm.cached.means  # [variant, N, 1, H, W]
    torch.testing.assert_close(means[1], means[0].flip(-1))
    assert dm.cached[0]["caption"] == "half"


def test_regularization_images_are_mixed_in_and_flagged(tmp_path):
    from datamodules.shapes import ShapesDataModule

    source = ShapesDataModule(resolution=32, train_size=12, val_size=4, train_split="concept")
    reg = ShapesDataModule(resolution=32, train_size=20, val_size=4, seed=1)
    dm = FineTuneDataModule(
        source,
        resolution=32,
        regularization=reg,
        regularization_size=6,
        cache_latents=True,
        cache_dir=str(tmp_path),
        batch_size=18,
    )
    dm.setup("fit")
    assert len(dm.data_train) == 18
    items = [dm.data_train[i] for i in range(18)]
    assert all("star" in it["caption"] for it in items[:12]) and not any(
        "star" in it["caption"] for it in items[12:]
    )
    assert [it["is_regularization"] for it in items] == [False] * 12 + [True] * 6
    # the flags survive latent caching (memory and disk) and reach the batch
    encode = lambda x: (x[:, :4, ::4, ::4], torch.ones_like(x[:, :4, ::4, ::4]))
    dm.cache_latents(encode, "identity")
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_regularization"].sum() == 6 and "latent_mean" in batch
    again = FineTuneDataModule(
        source,
        resolution=32,
        regularization=reg,
        regularization_size=6,
        cache_latents=True,
        cache_dir=str(tmp_path),
    )
    again.setup("fit")
    again.cache_latents(lambda x: (_ for _ in ()).throw(AssertionError("re-encoded")), "identity")
    assert again.cached.flags.tolist() == [False] * 12 + [True] * 6
    # validation defaults to held-out regularisation images, never the concept's own training images
    assert all(again.data_val[i]["is_regularization"] for i in range(len(again.data_val)))


def test_few_image_folder_keeps_every_image_for_training(compose_cfg, tmp_path):
    from hydra.utils import instantiate
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a photo of sks")
    cfg = compose_cfg(
        [
            "experiment=lora_finetune",
            "data=finetune_folder",
            f"data.source.root={tmp_path}",
            "data.source.resolution=32",
            "data.cache_dir=null",
        ]
    )
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    assert len(dm.data_train) == 4 and dm.data_val is None
    assert not is_overridden("val_dataloader", dm)  # Lightning sees no validation loader at all
    assert len(dm.train_dataloader().dataset) == 40  # data.repeats=10


def test_no_validation_data_runs_no_validation_loop_without_warnings(compose_cfg, base_ckpt, tmp_path):
    """data.validation=none: no empty loader for Lightning to warn about ("Total length ... is zero")."""
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a photo of sks")
    cfg = compose_cfg(
        [
            "experiment=lora_finetune",
            *FINETUNE_PARTS,
            "debug=smoke",
            f"model.base={base_ckpt}",
            "data=finetune_folder",
            f"data.source.root={tmp_path}",
            "data.source.resolution=32",
            "data.cache_dir=null",
            "model.log_prompts=[a photo of sks]",
        ]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objects = train(cfg)
    assert not [w for w in caught if "length" in str(w.message) and "zero" in str(w.message)]
    trainer = objects["trainer"]
    assert trainer.global_step == 4 and trainer.num_val_batches == []  # trained, never validated
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_prior_preservation_weighting_through_the_method_loss():
    from ldm.models.finetune.lora import LoRA

    losses = torch.tensor([1.0, 3.0, 10.0, 20.0])
    batch = {"is_regularization": torch.tensor([False, False, True, True])}
    assert float(LoRA().loss(losses, batch)) == pytest.approx(8.5)  # plain mean
    weighted = LoRA().loss(losses, batch, 0.5)
    assert float(weighted) == pytest.approx(2.0 + 0.5 * 15.0)
    only_instance = LoRA().loss(losses[:2], {"is_regularization": torch.tensor([0, 0])}, 0.5)
    assert float(only_instance) == pytest.approx(2.0)


def test_lora_finetune_from_stable_diffusion_single_file(compose_cfg, base_ckpt, tmp_path):
    """model.base may be an SD single file (here our tiny model exported to the SD v1 layout)."""
    from ldm.io.single_file_export import export_components
    from ldm.models.base_loader import load_base_model

    single = export_components(
        load_base_model(base_ckpt), tmp_path / "tiny-sd.safetensors", dtype=torch.float32
    )
    cfg = compose_cfg(lora_overrides(Path(single), ["data.cache_dir=null"]))
    _, objects = train(cfg)
    model = objects["model"]
    base = load_lightning_model(base_ckpt)
    torch.testing.assert_close(model.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
    assert (Path(cfg.paths.output_dir) / "adapters" / "lora_finetune.safetensors").is_file()


def test_optimizer_in_backward_equals_the_plain_optimizer(compose_cfg, base_ckpt):
    """The step fused into backward gives the same weights as AdamW stepping after backward."""
    states = []
    for fused in ("false", "true"):
        cfg = compose_cfg(
            lora_overrides(
                base_ckpt,
                [
                    "data.cache_dir=null",
                    f"model.optimizer_in_backward={fused}",
                    "callbacks.image_logger=null",
                ],
            ),
            output_name=f"fused-{fused}",
        )
        _, objects = train(cfg)
        assert objects["trainer"].global_step == 4
        states.append(objects["model"].method.state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-6, atol=1e-7)
    assert any(float(v.abs().max()) > 0 for k, v in states[1].items() if "lora_up" in k)


def test_optimizer_choices_build(compose_cfg, base_ckpt):
    from transformers.optimization import Adafactor

    cfg = compose_cfg(
        lora_overrides(
            base_ckpt, ["data.cache_dir=null", "model/optimizer=adafactor", "callbacks.image_logger=null"]
        )
    )
    _, objects = train(cfg)
    assert isinstance(objects["trainer"].optimizers[0], Adafactor)
    cfg = compose_cfg(lora_overrides(base_ckpt, ["data.cache_dir=null", "model/optimizer=adamw8bit"]))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            train(cfg)


def test_a_base_checkpoint_is_read_once(base_ckpt, monkeypatch):
    from ldm.models.base_loader import load_base_model

    reads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    parts = load_base_model(base_ckpt)
    assert parts.unet is not None
    assert len([r for r in reads if str(r) == str(base_ckpt)]) == 1, reads
