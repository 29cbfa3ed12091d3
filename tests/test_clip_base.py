"""experiment=txt2img conditions on the frozen text tower of the newest experiment=clip run (issue 24 item 4):
found as the VAE is, an explicit path wins, no run -> one line naming both fixes, and a fine-tune on such a
base loads with the tower's weights from the checkpoint, also after the CLIP folder moved."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import hydra
import pytest
import torch

from ldm.modules.clip_run import clip_text_encoder
from ldm.modules.shapes_clip import ShapesCLIP
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.vae import AutoencoderKL
from ldm.utils.task import run_task
from tests.conftest import compose_train
from train import train

# TINY["txt2img"] of test_train.py, without its model/text_encoder=tiny: the default text encoder here
TXT2IMG = [
    "experiment=txt2img",
    "model/vae=tiny",
    "model/unet=tiny",
    "data.train_size=16",
    "data.val_size=4",
    "data.batch_size=4",
    "model.log_prompts=[a red circle on a blue background]",
    "model/sampler=ddim",
    "model.sampler.steps=2",
    "callbacks.rich_progress_bar=null",
    "logger=none",
]
PATH_KEY = "model.conditioner.embedders.0.module.path"


def fake_clip_run(log_dir: Path, name: str, seed: int, age_s: float = 0.0) -> Path:
    """A CLIP run as experiment=clip leaves it (``<run>/clip``), its text tower moved away from the tiny
    encoder's seeded start (so it is told apart from model/text_encoder=tiny); returns its text_encoder/."""
    clip = ShapesCLIP(seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in clip.model.text_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    folder = clip.save(log_dir / "clip" / "runs" / name / "clip") / "text_encoder"
    stamp = os.stat(folder / "config.json").st_mtime - age_s
    os.utime(folder / "config.json", (stamp, stamp))
    return folder


def tower_state(folder: Path) -> dict[str, torch.Tensor]:
    return CLIPTextEncoder.from_pretrained(folder).transformer.state_dict()


def same_weights(encoder: CLIPTextEncoder, state: dict[str, torch.Tensor]) -> bool:
    own = encoder.transformer.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


def vae_checkpoint(folder: Path) -> Path:
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, folder / "vae.ckpt")
    return folder / "vae.ckpt"


@pytest.fixture(scope="module")
def clip_base(tmp_path_factory):
    """Two CLIP runs (the newer one is used), then a 4-step txt2img run on them: (root, newer, older)."""
    root = tmp_path_factory.mktemp("clip_base")
    older = fake_clip_run(root / "logs", "older", seed=1, age_s=60)
    newer = fake_clip_run(root / "logs", "newer", seed=2)
    cfg = compose_train(root, [*TXT2IMG, "debug=smoke", f"model.vae_ckpt={vae_checkpoint(root)}"])
    _, objects = train(cfg)
    return root, newer, older, objects["model"], Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def test_txt2img_conditions_on_the_newest_clip_runs_frozen_text_tower(clip_base, caplog):
    root, newer, older, model, _ = clip_base
    encoder = model.text_encoder
    assert isinstance(encoder, CLIPTextEncoder) and encoder.frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    assert same_weights(encoder, tower_state(newer))  # after 4 training steps: unchanged, the newer run's
    assert not same_weights(encoder, tower_state(older))
    assert not same_weights(encoder, CLIPTextEncoder.tiny().transformer.state_dict())  # not the random one
    with caplog.at_level(logging.INFO):
        clip_text_encoder(None, root / "logs")
    assert f"text encoder: {newer.resolve()}" in caplog.text


def test_an_explicit_path_wins_over_the_newest_run(clip_base, tmp_path):
    root, _, older, _, _ = clip_base
    for given in (older, older.parent, older.parent.parent):  # text_encoder/, the run's clip/, the run
        search = f"model.conditioner.embedders.0.module.search_dir={root / 'logs'}"  # holds the newer run
        cfg = compose_train(tmp_path, [*TXT2IMG, f"{PATH_KEY}={given}", search])
        encoder = hydra.utils.instantiate(cfg.model.conditioner).text_encoder
        assert same_weights(encoder, tower_state(older)), given


def test_no_clip_run_is_one_error_line_naming_both_fixes(tmp_path, caplog):
    cfg = compose_train(tmp_path, [*TXT2IMG, "debug=fdr"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        run_task(train, cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "python train.py experiment=clip" in errors[0] and "model/text_encoder=tiny" in errors[0]
    assert str(tmp_path / "logs" / "clip") in errors[0]
    cfg = compose_train(tmp_path, [*TXT2IMG, "debug=fdr", "model/text_encoder=tiny"])  # the opt-out runs
    _, objects = train(cfg)
    assert same_weights(objects["model"].text_encoder, CLIPTextEncoder.tiny().transformer.state_dict())


def test_a_missing_explicit_path_is_one_error_line(tmp_path, caplog):
    cfg = compose_train(tmp_path, [*TXT2IMG, "debug=fdr", f"{PATH_KEY}={tmp_path / 'nowhere'}"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        run_task(train, cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (
        len(errors) == 1 and str(tmp_path / "nowhere") in errors[0] and "model/text_encoder=tiny" in errors[0]
    )


def test_the_checkpoint_names_the_clip_folder_it_used(clip_base):
    _, newer, _, _, last = clip_base
    module = torch.load(last, weights_only=True)["model_config"]["conditioner"]["embedders"]["0"]["module"]
    assert module["path"] == str(newer.resolve())  # not "the newest run", which may change
    assert module["checkpoint_architecture"] == {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "max_length": 20,
        "intermediate_size": 256,
    }


def test_a_finetune_on_the_base_loads_the_tower_from_the_checkpoint_after_the_clip_folder_moved(
    clip_base, tmp_path, caplog
):
    root, newer, _, _, last = clip_base
    state = tower_state(newer)
    work = tmp_path / "work"
    shutil.copytree(root / "logs" / "txt2img", work / "logs" / "txt2img")  # the base, without any CLIP run
    base = work / "logs" / "txt2img" / last.relative_to(root / "logs" / "txt2img")
    moved = {newer.parent.parent: tmp_path / "moved"}  # the CLIP run's folder goes elsewhere meanwhile
    shutil.move(newer.parent.parent, moved[newer.parent.parent])
    try:
        for method in ("lora_finetune", "textual_inversion_star"):
            cfg = compose_train(
                work,
                [
                    f"experiment={method}",
                    f"model.base={base}",
                    "debug=fdr",
                    "data.source.train_size=8",
                    "data.source.val_size=4",
                    "data.batch_size=4",
                    "data.cache_dir=null",
                    "model/sampler=ddim",
                    "model.sampler.steps=2",
                    "model.log_prompts=[a red star]",
                    "callbacks.rich_progress_bar=null",
                    "logger=none",
                ],
                output_name=method,
            )
            with caplog.at_level(logging.WARNING):
                _, objects = train(cfg)
            encoder = objects["model"].text_encoder
            names = set(state)
            own = {k: v for k, v in encoder.transformer.state_dict().items() if k in names}
            skip = "text_model.embeddings.token_embedding.weight"  # textual inversion adds rows to it
            assert all(torch.equal(own[k], state[k]) for k in names if k != skip), method
            rows = state[skip].shape[0]
            assert torch.equal(encoder.transformer.state_dict()[skip][:rows], state[skip]), method
        assert "is gone; rebuilding its architecture (the weights come from the checkpoint)" in caplog.text
    finally:
        shutil.move(moved[newer.parent.parent], newer.parent.parent)
