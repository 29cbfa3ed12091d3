"""``model.compile`` / ``sample.py --compile``: torch.compile of the UNet / VAE in place.

The train.py runs here compile with ``aot_eager`` (dynamo's graph capture and AOT autograd, the parts that
decide parameter names, gradients and adapters, without inductor's C++ builds, which take minutes on a
shared CPU); one test compiles with inductor, the real backend, on the tiny UNet.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from ldm.modules.compile import compile_in_place, compile_mode, is_compiled, repeated_blocks
from ldm.modules.unet import UNetModel
from ldm.utils.task import run_task
from tests.conftest import compose_train, load_script
from tests.test_finetune_lora import base_ckpt, lora_overrides  # noqa: F401 - base_ckpt is a fixture
from tests.test_resume_exact import QUIET, vae_ckpt  # noqa: F401 - vae_ckpt is a fixture
from train import train

AOT = "model.compile_backend=aot_eager"


def txt2img_args(vae: Path, steps: int, *extra: str) -> list[str]:
    return [
        "experiment=txt2img",
        "model/vae=tiny",
        "model/unet=tiny",
        "model/text_encoder=tiny",
        *QUIET,
        "debug=smoke",
        f"trainer.max_steps={steps}",
        "trainer.limit_train_batches=4",
        "trainer.val_check_interval=2",
        "data.batch_size=4",
        "data.train_size=16",
        "data.val_size=4",
        f"model.vae_ckpt={vae}",
        "model.log_prompts=[a red circle on a blue background]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
        *extra,
    ]


def fit(tmp_path: Path, args: list[str], name: str):
    cfg = compose_train(tmp_path, args, output_name=name)
    _, objects = train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return objects["model"], last


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compile_values_and_a_bad_one_is_one_clear_error(tmp_path, caplog):
    assert [compile_mode(v) for v in (False, None, "false", True, "true", "whole", "blocks")] == [
        None,
        None,
        None,
        "whole",
        "whole",
        "whole",
        "blocks",
    ]
    cfg = compose_train(
        tmp_path, ["experiment=vae", "model/vae=tiny", *QUIET, "debug=smoke", "model.compile=fast"]
    )
    with pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert stop.value.code == 1 and len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(
        "error: model.compile=fast: not a compile mode; use one of false, true, whole"
    )
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_compiled_run_keeps_names_and_resumes_both_ways(tmp_path, vae_ckpt, capsys):  # noqa: F811
    """A compiled fit (blocks) writes the eager run's keys, ends where the eager run ends, and a checkpoint
    of either resumes under the other; the compile time is logged and in the run summary; sample.py
    --compile draws the eager images."""
    straight, _ = fit(tmp_path, txt2img_args(vae_ckpt, 4), "eager4")
    eager2, eager_last = fit(tmp_path, txt2img_args(vae_ckpt, 2), "eager2")
    compiled2, compiled_last = fit(tmp_path, txt2img_args(vae_ckpt, 2, "model.compile=blocks", AOT), "c2")
    assert compiled2.compile_clock is not None and compiled2.compile_clock.seconds is not None
    assert is_compiled(compiled2.unet) and not is_compiled(eager2.unet)
    saved = torch.load(compiled_last, weights_only=True)["state_dict"]
    assert list(saved) == list(torch.load(eager_last, weights_only=True)["state_dict"])
    assert not any("_orig_mod" in key for key in saved)
    torch.testing.assert_close(weights(compiled2), weights(eager2))

    # compiled -> eager, eager -> compiled: both continue to the uninterrupted eager run's weights
    to_eager, _ = fit(tmp_path, txt2img_args(vae_ckpt, 4, f"ckpt_path={compiled_last}"), "c2e4")
    to_compiled, _ = fit(
        tmp_path, txt2img_args(vae_ckpt, 4, f"ckpt_path={eager_last}", "model.compile=blocks", AOT), "e2c4"
    )
    reference = weights(straight)
    for resumed in (to_eager, to_compiled):
        assert resumed.trainer.global_step == 4
        torch.testing.assert_close(weights(resumed), reference)
    assert max(float((reference[k] - weights(eager2)[k]).abs().max()) for k in reference) > 0  # it trained

    sample = load_script("sample.py")
    common = ["--ckpt", str(compiled_last), "--prompt", "a red circle", "--n", "1", "--steps", "2"]
    sample.main([*common, "--sampler", "ddim", "--out", str(tmp_path / "eager")])
    sample.main([*common, "--sampler", "ddim", "--out", str(tmp_path / "compiled")])
    sample.main(
        [*common, "--sampler", "ddim", "--compile", "blocks", "--compile-backend", "aot_eager"]
        + ["--out", str(tmp_path / "compiled"), "--overwrite"]
    )
    assert "first batch (UNet compiled, blocks)" in capsys.readouterr().out
    from PIL import Image

    images = [Image.open(next((tmp_path / d).glob("000_*.png"))) for d in ("eager", "compiled")]
    assert images[0].tobytes() == images[1].tobytes()


def test_lora_trains_under_a_compiled_unet(tmp_path, base_ckpt, caplog):  # noqa: F811
    """LoRA layers injected before the compile are traced with the blocks and get gradients: the compiled
    fine-tune's adapter weights move as the eager one's do; the run summary reports the compile."""
    args = lora_overrides(base_ckpt, ["data.cache_dir=null", "callbacks.lr_monitor=null", "logger=none"])
    eager, _ = fit(tmp_path, args, "eager")
    with caplog.at_level(logging.INFO):
        compiled, _ = fit(tmp_path, [*args, "model.compile=blocks", AOT], "compiled")
    assert is_compiled(compiled.unet)
    lora = {k: v for k, v in compiled.method.state_dict().items()}
    assert lora.keys() == eager.method.state_dict().keys() and not any("_orig_mod" in k for k in lora)
    torch.testing.assert_close(lora, eager.method.state_dict())
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in compiled.method.parameters())
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "up" in k)  # up started at zero
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "compiled the UNet (blocks, " in messages and "Run summary" in messages
    assert "  compiled the UNet (blocks" in next(m for m in messages.split("Run summary")[1:])


def test_inductor_compiled_step_matches_eager_and_keeps_the_state_dict():
    """The real backend: one training step of the tiny UNet with its repeated blocks compiled by inductor
    updates the weights as the eager step does (within float tolerance), under the same names."""
    torch.manual_seed(0)
    kwargs = load_script("benchmarks/unet_step.py").unet_kwargs("tiny")
    eager = UNetModel(**kwargs)
    compiled = copy.deepcopy(eager)
    keys = list(eager.state_dict())
    assert compile_in_place(compiled, "blocks") == len(repeated_blocks(eager)) > 0
    assert list(compiled.state_dict()) == keys
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 7, 64)
    target = torch.randn_like(x)
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.nn.functional.mse_loss(model(x, t, context), target).backward()
        optimizer.step()
    torch.manual_seed(0)
    before = UNetModel(**kwargs).state_dict()
    moved = max(float((eager.state_dict()[k] - before[k]).abs().max()) for k in keys)
    assert moved > 1e-4
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-5)


def test_inductor_without_a_cpp_compiler_is_named_before_training(monkeypatch):
    import ldm.modules.compile as compile_module

    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    unet = UNetModel(**load_script("benchmarks/unet_step.py").unet_kwargs("tiny"))
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler on CPU .* or set model.compile=false"):
        compile_in_place(unet, "blocks")
    assert not is_compiled(unet)
    assert compile_in_place(unet, "blocks", "aot_eager") > 0  # other backends build no C++
