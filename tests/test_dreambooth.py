"""DreamBooth: the full-UNet method (parameters, checkpoint state, SD single-file export), the combined
instance + prior-preservation loss, and the experiments end to end at test size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sample
from benchmarks import dreambooth_step, subject_fidelity
from ldm.io.kohya_lora import load_kohya_lora
from ldm.io.safe_load import read_safetensors_metadata
from ldm.models import pipeline
from ldm.models.base_loader import load_base_model
from ldm.models.checkpoint import load_lightning_model
from ldm.models.finetune.full import FullUNet
from ldm.models.finetune.method import MethodDisabledUnsupported
from tests.forked_cli import run_train_forked
from tests.test_finetune_lora import base_ckpt  # noqa: F401  (module-scoped tiny txt2img base)
from tests.test_latent_diffusion import tiny_model
from train import train


def attached(**kwargs) -> tuple[FullUNet, torch.nn.Module]:
    torch.manual_seed(0)
    model = tiny_model(scale_factor=0.5, ema_decay=None)
    model.image_resolution = 32
    for part in (model.unet, model.vae, model.text_encoder):
        part.requires_grad_(False)
    method = FullUNet(**kwargs)
    method.attach(model)
    return method, model


def test_full_unet_trains_the_whole_unet_and_optionally_the_text_encoder():
    method, model = attached()
    assert {id(p) for p in method.parameters()} == {id(p) for p in model.unet.parameters()}
    assert all(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert set(method.state_dict()) == {f"unet.{k}" for k in model.unet.state_dict()}
    with pytest.raises(MethodDisabledUnsupported):
        method.disabled()

    method, model = attached(train_text_encoder=True, text_encoder_lr=1e-5)
    groups = method.param_groups()
    assert (
        [g["name"] for g in groups] == ["unet", "text_encoder"]
        and groups[1]["lr"] == 1e-5
        and "lr" not in groups[0]
    )
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for p in model.text_encoder.transformer.parameters()
    }
    assert method.trains_text_encoder and not model.text_encoder.cache_enabled
    optimizer = torch.optim.AdamW(groups, lr=1e-4)  # what the core builds from param_groups()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-5]
    assert any(k.startswith("text_encoder.") for k in method.state_dict())
    with pytest.raises(ValueError, match="train_text_encoder"):
        FullUNet(text_encoder_lr=1e-5)


def test_full_unet_state_round_trip_is_strict():
    method, _ = attached(train_text_encoder=True)
    state = {k: v.clone() + 0.01 for k, v in method.state_dict().items()}
    other, _ = attached(train_text_encoder=True)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({k: v for k, v in state.items() if k.startswith("unet.")})
    unet_only, _ = attached()
    with pytest.raises(ValueError, match="unexpected"):
        unet_only.load_state_dict(state)


def test_combined_loss_weights_class_items():
    per_item = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    batch = {"is_regularization": torch.tensor([False, False, True, True, True])}
    assert float(FullUNet().loss(per_item, batch, 1.0)) == pytest.approx(1.5 + 13 / 3)
    assert float(FullUNet().loss(per_item, batch, 0.5)) == pytest.approx(1.5 + 0.5 * 13 / 3)
    assert float(FullUNet().loss(per_item, batch, 0.0)) == pytest.approx(1.5)  # prior off
    assert float(FullUNet().loss(per_item, batch)) == pytest.approx(16 / 5)  # no weight: one plain mean
    only_instances = {"is_regularization": [False] * 5}
    assert float(FullUNet().loss(per_item, only_instances, 1.0)) == pytest.approx(16 / 5)
    grad = torch.ones(5, requires_grad=True)
    FullUNet().loss(grad * per_item, batch, 2.0).backward()
    torch.testing.assert_close(grad.grad, torch.tensor([0.5, 1.0, 2 / 3 * 3, 2 / 3 * 4, 2 / 3 * 6]))


def test_export_is_an_sd_single_file_that_loads_back(tmp_path):
    method, model = attached()
    with torch.no_grad():
        model.unet.out[-1].bias.add_(0.25)  # a "fine-tuned" UNet
    path = method.export(tmp_path / "dreambooth.safetensors", {"ss_steps": 3})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert meta["ldm.method"] == "dreambooth-full-unet" and meta["ss_steps"] == "3"

    loaded = load_base_model(path)
    assert loaded.scale_factor == pytest.approx(0.5) and loaded.resolution == 32
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value.half().float())
    x, t, prompts = torch.randn(1, 4, 8, 8), torch.tensor([300]), ["a sks square on a red background"]
    with torch.no_grad():
        expected = model.unet(x, t, model.text_encoder(prompts))
        got = loaded.unet(x, t, loaded.text_encoder(prompts))
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # fp16 file


# ------------------------------------------------------------------------ the experiments end to end


def dreambooth_overrides(experiment: str, base, tmp_path: Path, extra=()) -> list[str]:
    """`python train.py experiment=<experiment> debug=smoke`, test-sized: 3 instance + 4 class images."""
    return [
        f"experiment={experiment}",
        "debug=smoke",
        f"model.base={base}",
        "model/sampler=ddim",
        "model.sampler.steps=2",
        "callbacks.rich_progress_bar=null",
        "data.batch_size=4",
        "data.val_size=2",
        "data.concepts.0.num_instance_images=3",
        "data.concepts.0.num_class_images=4",
        "data.class_images.sampler=ddim",
        "data.class_images.steps=2",
        f"data.class_images.cache_dir={tmp_path / 'class_images'}",
        "data.cache_dir=null",
        "model.log_prompts=[a sks square on a red background]",
        *extra,
    ]


def save_run_config(cfg) -> None:
    """What Hydra writes into every run folder of `python train.py` (the tests call train() directly)."""
    (Path(cfg.paths.output_dir) / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")


def test_dreambooth_full_unet_run_checkpoint_export_and_sampling(compose_cfg, base_ckpt, tmp_path):  # noqa: F811
    cfg = compose_cfg(dreambooth_overrides("dreambooth", base_ckpt, tmp_path))
    _, objects = train(cfg)
    model, run = objects["model"], Path(cfg.paths.output_dir)

    # class images were generated by the base before training, cached, and trained on with their flag
    folders = [p for p in (tmp_path / "class_images").iterdir() if p.is_dir()]
    assert (
        len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 4 and (folders[0] / "key.json").is_file()
    )
    flags = objects["datamodule"].data_train
    assert sorted(flags[i]["is_regularization"] for i in range(len(flags))) == [False] * 4 + [True] * 4

    # the preset trains the whole UNet and the text encoder's transformer (its own lr); the VAE is the base's
    base = load_lightning_model(base_ckpt)
    text = model.text_encoder.transformer
    assert {id(p) for p in model.method.parameters()} == {id(p) for p in model.unet.parameters()} | {
        id(p) for p in text.parameters()
    }
    groups = objects["trainer"].optimizers[0].param_groups
    assert [(g["name"], g["initial_lr"]) for g in groups] == [("unet", 2.5e-4), ("text_encoder", 5e-5)]
    for trained, frozen in ((model.unet, base.unet_ema.module), (text, base.text_encoder.transformer)):
        assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), frozen.parameters()))
    for a, b in zip(model.vae.parameters(), base.vae.parameters()):
        assert torch.equal(a, b)

    # our checkpoint holds the UNet and the text transformer (the method's state); sample.py --ckpt rebuilds
    # the fine-tuned model
    ckpt_path = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt_path, weights_only=True)["state_dict"]
    assert set(saved) == {f"method.unet.{k}" for k in model.unet.state_dict()} | {
        f"method.text_encoder.{k}" for k in text.state_dict()
    } | {"scale_factor"}
    prompts = ["a sks square on a red background"]
    rebuilt = load_lightning_model(ckpt_path)
    expected = model.generate(prompts, seed=3)
    torch.testing.assert_close(rebuilt.generate(prompts, seed=3), expected)
    grid = sample.main(
        [
            "--ckpt",
            str(ckpt_path),
            "--prompt",
            prompts[0],
            "--n",
            "2",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "samples"),
        ]
    )
    assert grid.is_file() and len(list((tmp_path / "samples").glob("0*.png"))) == 2

    # the SD single file written at the end loads back (load_base_model, sample.py --ckpt) as the same model
    exported = run / "adapters" / "dreambooth.safetensors"
    assert exported.is_file()
    single = pipeline.load_for_sampling(str(exported), sampler=model.sampler)
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(single.unet.state_dict()[key], value.half().float())
    for key, value in text.state_dict().items():  # the trained text encoder travels in the file
        torch.testing.assert_close(single.text_encoder.transformer.state_dict()[key], value.half().float())
    # fp16 weights
    torch.testing.assert_close(
        single.generate(prompts, seed=3, guidance_scale=model.hparams.guidance_scale),
        expected,
        atol=0.05,
        rtol=0.05,
    )

    # `python benchmarks/subject_fidelity.py --run <run>` scores the base and the exported model
    save_run_config(cfg)
    results = subject_fidelity.main(
        [
            "--run",
            str(run),
            "--n",
            "2",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--grid-dir",
            str(tmp_path / "grids"),
        ]
    )
    assert set(results) == {
        ("zwx", kind, name) for kind in ("subject", "class", "known") for name in ("base", "full")
    }
    assert all(0.0 <= r["subject_rate"] <= 1.0 and r["n"] == 2 for r in results.values())
    assert len(list((tmp_path / "grids").glob("zwx_*.png"))) == 6


def test_dreambooth_lora_same_data_and_objective_lora_parameters(compose_cfg, base_ckpt, tmp_path):  # noqa: F811
    cfg = compose_cfg(dreambooth_overrides("dreambooth_lora", base_ckpt, tmp_path))
    assert cfg.data == compose_cfg(dreambooth_overrides("dreambooth", base_ckpt, tmp_path)).data
    assert cfg.model.prior_loss_weight == 1.0
    _, objects = train(cfg)
    model, run = objects["model"], Path(cfg.paths.output_dir)
    assert all("lora_" in k or k.endswith(".alpha") for k in model.method.state_dict())
    exported = run / "adapters" / "dreambooth_lora.safetensors"
    assert read_safetensors_metadata(exported)["ss_network_module"] == "networks.lora"
    assert load_kohya_lora(exported, unet=load_lightning_model(base_ckpt).unet_ema.module)["modules"] > 0
    # the class images of the full run's settings are the same files (same base, prompts, sampler)
    assert len([p for p in (tmp_path / "class_images").iterdir() if p.is_dir()]) == 1
    # the fidelity script merges the kohya file into the base
    save_run_config(cfg)
    results = subject_fidelity.main(["--run", str(run), "--n", "2", "--sampler", "ddim", "--steps", "2"])
    assert ("zwx", "subject", "lora") in results


def test_step_benchmark_full_vs_lora(base_ckpt, tmp_path):  # noqa: F811
    """`python benchmarks/dreambooth_step.py --base <ckpt>`: both variants train, LoRA trains far fewer
    weights."""
    tiny = [
        "data.concepts.0.num_class_images=2",
        "data.class_images.steps=2",
        "data.cache_dir=null",
        f"data.class_images.cache_dir={tmp_path}",
        "model/sampler=ddim",
        "model.sampler.steps=2",
    ]
    results = dreambooth_step.main(
        [
            "--base",
            str(base_ckpt),
            "--batch",
            "2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--in-process",
            *[f"--override={o}" for o in tiny],
        ]
    )
    assert results["full"]["steps"] == results["lora"]["steps"] == 3
    # the preset's LoCon (rank 16, convs rank 8): 26% of this 1 M-parameter UNet, 12% of the README chain's
    assert results["lora"]["trainable_params"] < 0.3 * results["full"]["trainable_params"]
    assert all(r["step_s"] > 0 and r["peak_gib"] > 0 for r in results.values())


def concept_overrides(index: int) -> list[str]:
    return [f"data.concepts.{index}.num_instance_images=2", f"data.concepts.{index}.num_class_images=2"]


def test_cookbook_two_concepts_in_one_run(compose_cfg, base_ckpt, tmp_path):  # noqa: F811
    """`python train.py experiment=dreambooth data=dreambooth_two_concepts model/method=full`"""
    cfg = compose_cfg(
        [
            *dreambooth_overrides(
                "dreambooth", base_ckpt, tmp_path, ["data=dreambooth_two_concepts", "model/method=full"]
            ),
            *concept_overrides(0),
            *concept_overrides(1),
            "debug=fdr",
        ]
    )
    _, objects = train(cfg)
    data = objects["datamodule"].data_train
    captions = [data[i]["caption"] for i in range(len(data))]
    assert any(c.startswith("a zwx square") for c in captions) and any(
        c.startswith("a qwe circle") for c in captions
    )
    # one per class prompt set
    assert len([p for p in (tmp_path / "class_images").iterdir() if p.is_dir()]) == 2
    assert [g["name"] for g in objects["trainer"].optimizers[0].param_groups] == ["unet"]  # the UNet alone


def test_cookbook_prior_preservation_off_and_unet_only(compose_cfg, base_ckpt, tmp_path):  # noqa: F811
    """`... model.prior_loss_weight=0` and `... model/method=full` (the UNet only), with
    `model.gradient_checkpointing=true`"""
    cfg = compose_cfg(
        [
            *dreambooth_overrides("dreambooth", base_ckpt, tmp_path),
            "debug=fdr",
            "model.prior_loss_weight=0",
            "model/method=full",
            "model.gradient_checkpointing=true",
        ]
    )
    _, objects = train(cfg)
    model = objects["model"]
    assert model.hparams.prior_loss_weight == 0.0
    assert any(getattr(m, "use_checkpoint", False) for m in model.unet.modules())
    optimizer = objects["trainer"].optimizers[0]
    assert [g["name"] for g in optimizer.param_groups] == ["unet"]
    base = load_lightning_model(base_ckpt)
    for a, b in zip(model.text_encoder.parameters(), base.text_encoder.parameters()):
        assert torch.equal(a, b)
    assert not any(k.startswith("text_encoder.") for k in model.method.state_dict())


def test_cookbook_own_subject_from_a_folder(compose_cfg, base_ckpt, tmp_path):  # noqa: F811
    """`python train.py experiment=dreambooth 'data.concepts=[{identifier: sks, class_noun: dog,
    instance_dir: /data/dog, instance_prompt: ..., class_prompt: ..., num_class_images: ...}]'`"""
    from PIL import Image

    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 40), (80 * i, 100, 50)).save(folder / f"{i}.jpg")
    # as in the README
    concept = (
        f'{{identifier: sks, class_noun: dog, instance_dir: {folder}, instance_prompt: "a {{identifier}} '
        '{class_noun}", class_prompt: "a {class_noun}", num_class_images: 2}'
    )
    cfg = compose_cfg(
        [*dreambooth_overrides("dreambooth", base_ckpt, tmp_path), "debug=fdr", f"data.concepts=[{concept}]"]
    )
    _, objects = train(cfg)
    data = objects["datamodule"].data_train
    assert sorted(data[i]["caption"] for i in range(len(data))) == [
        "a dog",
        "a dog",
        "a sks dog",
        "a sks dog",
        "a sks dog",
    ]


def test_class_images_are_generated_once_under_ddp(base_ckpt, tmp_path):  # noqa: F811
    """`trainer=ddp_sim` (two processes): rank zero generates the class images, the other waits and reads
    them."""
    result = run_train_forked(
        [
            *dreambooth_overrides("dreambooth", base_ckpt, tmp_path),
            "trainer=ddp_sim",
            "trainer.strategy=ddp_fork",
            f"paths.log_dir={tmp_path / 'logs'}",
            "callbacks.rich_progress_bar=null",
            "logger=csv",
            "callbacks.image_logger=null",
            "trainer.max_steps=1",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("Generating 4 of 4 class images") == 1, output[-3000:]
    assert "rank 1: using the class images rank zero prepared" in output
    folders = [p for p in (tmp_path / "class_images").iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 4
