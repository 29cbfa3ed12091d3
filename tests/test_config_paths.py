"""A checkpoint names its local files by absolute path, so it loads from any working directory."""

from __future__ import annotations

import os

import torch

from ldm.utils.config_paths import absolute_local_paths
from tests.test_compile import fit, txt2img_args
from tests.test_resume_exact import vae_ckpt  # noqa: F401 - a fixture


def test_relative_paths_that_exist_become_absolute_others_stay(tmp_path):
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "vae.ckpt").write_bytes(b"")
    config = {
        "vae_ckpt": "vae.ckpt",
        "base": "openai/clip-vit-large-patch14",  # a hub id: no such local path
        "conditioner": {
            "embedders": {"0": {"module": {"_target_": "x", "path": "models/clip", "layer": "last"}}}
        },
        "log_prompts": ["vae.ckpt"],  # not a path key
        "vae_path": None,
        "name": "models/clip",  # not a path key
    }
    out = absolute_local_paths(config, cwd=tmp_path)
    assert out["vae_ckpt"] == str((tmp_path / "vae.ckpt").resolve())
    assert out["conditioner"]["embedders"]["0"]["module"]["path"] == str((tmp_path / "models/clip").resolve())
    assert out["base"] == "openai/clip-vit-large-patch14"
    assert out["log_prompts"] == ["vae.ckpt"] and out["name"] == "models/clip" and out["vae_path"] is None
    assert config["vae_ckpt"] == "vae.ckpt"  # a copy: the input is unchanged


def test_a_run_given_a_relative_path_writes_it_absolute_into_its_checkpoint(tmp_path, vae_ckpt, monkeypatch):  # noqa: F811
    monkeypatch.chdir(vae_ckpt.parent)
    model, last = fit(tmp_path, txt2img_args(vae_ckpt.name, 1), "relative")
    saved = torch.load(last, weights_only=False)
    config = saved.get("model_config") or saved["hyper_parameters"].get("model_config")
    assert config["vae_ckpt"] == str(vae_ckpt.resolve())
    assert os.path.isabs(model.model_config["vae_ckpt"])
