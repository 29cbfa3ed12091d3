"""One ``error:`` line, naming the fix, for the mistakes issue 27 found a new user making: a legacy pickled
embedding that ``weights_only`` refuses, and a Stable Diffusion single file without a tokenizer given to
``train.py``."""

from __future__ import annotations

import logging

import pytest
import torch

import sample
from ldm.utils.task import run_main
from tests.test_clip_tokenizer_fallback import clip_vocab_file  # noqa: F401 - fixture (no tokenizer inside)
from tests.test_sample_cli import single_file  # noqa: F401 - pytest fixture (a tiny SD single file)
from tests.test_user_errors import one_error_line


def sample_args(ckpt, tmp_path, *extra) -> list[str]:
    out = ["--prompt", "x", "--n", "1", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")]
    return ["--ckpt", str(ckpt), *out, *extra]


def test_legacy_pickled_embedding_is_one_line(single_file, tmp_path, capsys):  # noqa: F811
    """The original textual_inversion's .pt pickles a ParameterDict; weights_only refuses it (unpickling it
    could run code): one line naming the file and how to convert it, no image written."""
    legacy = tmp_path / "old-style.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 32))})
    torch.save({"string_to_param": params, "name": "old"}, legacy, _use_new_zipfile_serialization=False)
    line = one_error_line(
        capsys, lambda: run_main(sample.main, sample_args(single_file, tmp_path, "--embedding", str(legacy)))
    )
    assert f"refusing to load embedding {legacy}: a legacy pickle" in line and "weights_only=True" in line, (
        line
    )
    assert "weights_only=False" in line and f"use {legacy.stem}.safetensors" in line, line  # the fix
    assert not (tmp_path / "out" / "grid.png").exists()
    # the conversion the line gives works, and its result loads (triggered by its file name)
    command = line.split("convert it once: ", 1)[1].split(" and use ")[0]
    assert command.startswith('python -c "') and command.endswith('"')
    exec(command.removeprefix('python -c "')[:-1], {})  # noqa: S102 - the file is our own
    from ldm.io.embeddings import load_embedding

    converted = load_embedding(legacy.with_suffix(".safetensors"))
    assert converted.token == "old-style" and torch.equal(converted.vectors, params["*"].detach())


def test_train_py_on_a_single_file_without_tokenizer_is_one_line(
    clip_vocab_file,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """Before: a warning, then RuntimeError "this CLIPTextEncoder has no tokenizer" deep in training. Now one
    line naming model.base_tokenizer and open_clip_torch, before the weights load."""
    import ldm.io.sd_tokenizer
    import ldm.models.finetune.module
    from ldm.utils.task import run_task
    from tests.conftest import compose_train
    from train import train

    monkeypatch.setattr(ldm.io.sd_tokenizer, "open_clip_bpe_path", lambda: None)
    monkeypatch.setattr(ldm.io.sd_tokenizer, "DEFAULT_TOKENIZERS", {})

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the tokenizer check")

    monkeypatch.setattr(ldm.models.finetune.module, "load_base_model", no_loading)
    cfg = compose_train(
        tmp_path,
        ["experiment=lora_finetune", f"model.base={clip_vocab_file}", "debug=smoke", "logger=none"],
    )
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    assert stop.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "embeds no tokenizer" in errors[0] and "model.base_tokenizer" in errors[0], errors[0]
    assert "pip install --no-deps open_clip_torch" in errors[0], errors[0]
