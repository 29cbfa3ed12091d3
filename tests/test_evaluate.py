"""scripts/evaluate.py on a smoke LoRA run: the table per prompt group, base vs base + method, the grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose_train, load_script
from tests.metric_models import save_clip, save_dino
from tests.test_hypernetwork import tiny_lightning_checkpoint
from train import train

SHORT = ["--n", "2", "--sampler", "ddim", "--steps", "2"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A 2-step LoRA fine-tune of a tiny base, its .hydra/config.yaml as Hydra writes it, tiny CLIP/DINO."""
    root = tmp_path_factory.mktemp("evaluate")
    base = tiny_lightning_checkpoint(root / "base.ckpt")
    cfg = compose_train(
        root,
        [
            "experiment=lora_finetune",
            "model/sampler=ddim",
            "model.sampler.steps=2",
            "callbacks.rich_progress_bar=null",
            "debug=smoke",
            "trainer.max_steps=2",
            "data.source.train_size=8",
            "data.source.val_size=4",
            "data.batch_size=4",
            "data.cache_dir=null",
            "data.source.resolution=16",
            f"model.base={base}",
            "model.log_prompts=[a red star on a blue background,a green circle on a white background]",
        ],
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return {"run": run, "base": base, "clip": save_clip(root / "clip"), "dino": save_dino(root / "dino")}


def test_evaluate_a_run_writes_the_table_and_the_grid(smoke_run):
    run = smoke_run["run"]
    argv = ["--run", str(run), "--clip", str(smoke_run["clip"]), "--dino", str(smoke_run["dino"])]
    results = load_script("scripts/evaluate.py").main([*argv, "--subject-match", "star", *SHORT])
    assert set(results) == {("subject", "base"), ("subject", "tuned"), ("other", "base"), ("other", "tuned")}
    assert set(results[("subject", "tuned")]) == {"clip_t", "clip_i", "dino", "samples"}
    assert (
        set(results[("other", "base")]) == {"clip_t", "samples"}
        and results[("other", "base")]["samples"] == 2
    )
    out = run / "evaluation"
    table = (out / "evaluation.md").read_text()
    assert "| subject | tuned |" in table and "| other | base |" in table
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["groups"] == {
        "subject": ["a red star on a blue background"],
        "other": ["a green circle on a white background"],
    }
    assert Image.open(out / "grid.png").size[0] > 128


def test_evaluate_from_flags_measures_the_class_prompts(smoke_run, tmp_path):
    references = tmp_path / "subject"
    references.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 20), colour).save(references / f"{i}.png")
    lora = next((smoke_run["run"] / "adapters").glob("*.safetensors"))
    argv = [
        "--ckpt", str(smoke_run["base"]), "--lora", str(lora), "--references", str(references),
        "--subject-prompt", "a red star", "--class-prompt", "a star", "--class-prompt", "a circle",
        "--dino", str(smoke_run["dino"]), "--out", str(tmp_path / "out"), *SHORT,
    ]  # fmt: skip
    results = load_script("scripts/evaluate.py").main(argv)
    assert (
        set(results[("class", "tuned")]) == {"pres", "samples"} and results[("class", "base")]["samples"] == 4
    )
    assert set(results[("subject", "base")]) == {"dino", "samples"}
    assert (tmp_path / "out" / "grid.png").is_file()


def test_evaluate_needs_a_metric_model_and_a_method(smoke_run):
    evaluate = load_script("scripts/evaluate.py")
    with pytest.raises(ValueError, match="--clip and/or --dino"):
        evaluate.main(["--run", str(smoke_run["run"])])
    with pytest.raises(ValueError, match="give --run, or --ckpt with --lora"):
        evaluate.main(
            ["--ckpt", str(smoke_run["base"]), "--dino", str(smoke_run["dino"]), "--subject-prompt", "x"]
        )
