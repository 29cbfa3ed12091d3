"""Pivotal tuning (``experiment=pivotal_tuning``): a new token and a LoRA trained together, each with its
own learning rate, the token frozen after a fraction of the steps; the LoRA file bundles the token
(``bundle_emb.<token>.string_to_param.*``) and the embedding is also written alone; ``sample.py --lora``
adds the bundled token; a killed run resumes exactly."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ldm.io.bundled_embeddings import read_bundled_embeddings
from ldm.io.embeddings import load_embedding
from ldm.io.kohya_lora import load_kohya_lora
from ldm.models.base_loader import load_base_model
from ldm.models.finetune.pivotal import PivotalTuning
from ldm.modules.adapters import lora as lora_lib
from tests.conftest import compose_train
from tests.test_finetune_lora import FINETUNE_PARTS, base_ckpt  # noqa: F401 - base_ckpt is a fixture
from tests.test_resume_exact import KILL_STEP, QUIET, SCHEDULE, max_difference, run_cli
from tests.test_resume_methods import trained_state
from train import train

TOKEN = "<gem>"


class RecordVectors(L.Callback):
    """The token's vectors and one LoRA up-weight at the start of every training step."""

    def __init__(self):
        self.vectors, self.lora = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        method = pl_module.method
        self.vectors.append(method.textual_inversion.parameters()[0].detach().clone())
        self.lora.append(torch.cat([p.detach().flatten() for p in method.lora.parameters()]).clone())


def pivotal_overrides(base: Path, extra=()) -> list[str]:
    return [
        "experiment=pivotal_tuning",
        *FINETUNE_PARTS,
        "debug=smoke",
        f"model.base={base}",
        "data.batch_size=2",
        "data.cache_dir=null",
        "model.log_prompts=['a <gem> on a red background']",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(base_ckpt, tmp_path_factory):  # noqa: F811
    cfg = compose_train(
        tmp_path_factory.mktemp("pivotal"),
        pivotal_overrides(
            base_ckpt,
            [
                "trainer.max_steps=6",
                "trainer.limit_train_batches=6",
                "trainer.max_epochs=-1",
                "model.method.ti_stop_fraction=0.5",
                "+callbacks.record._target_=tests.test_pivotal_tuning.RecordVectors",
            ],
        ),
    )
    _, objects = train(cfg)
    return objects, Path(cfg.paths.output_dir)


def test_token_and_lora_train_together_each_with_its_lr_the_token_for_half_the_steps(trained):
    objects, _ = trained
    model, trainer = objects["model"], objects["trainer"]
    assert isinstance(model.method, PivotalTuning) and trainer.global_step == 6
    groups = trainer.optimizers[0].param_groups
    vectors = model.method.textual_inversion.parameters()[0]
    assert [p for p in groups[0]["params"]] == [vectors] and groups[0]["initial_lr"] == 2.0e-2
    assert groups[1]["initial_lr"] == 1.0e-3 and len(groups[1]["params"]) == len(
        model.method.lora.parameters()
    )
    recorder = next(c for c in trainer.callbacks if isinstance(c, RecordVectors))
    snapshots = [*recorder.vectors, vectors.detach()]  # at steps 0..5, then after step 5
    lora = [*recorder.lora, torch.cat([p.detach().flatten() for p in model.method.lora.parameters()])]
    moved = [not torch.equal(a, b) for a, b in itertools.pairwise(snapshots)]
    assert moved == [True, True, True, False, False, False]  # steps 0-2 train the token (ceil(0.5 x 6) = 3)
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(lora[2:]))  # the LoRA trains all along


def test_export_bundles_the_token_in_the_lora_and_writes_it_alone(trained, base_ckpt):  # noqa: F811
    objects, run = trained
    model = objects["model"]
    lora_file = run / "adapters" / "pivotal_tuning.safetensors"
    emb_file = run / "adapters" / "pivotal_tuning_emb.safetensors"
    keys = set(load_file(str(lora_file)))
    assert f"bundle_emb.{TOKEN}.string_to_param.*" in keys
    assert all(k.startswith("lora_unet_") for k in keys - {f"bundle_emb.{TOKEN}.string_to_param.*"})
    vectors = model.method.textual_inversion.parameters()[0].detach()
    assert torch.equal(read_bundled_embeddings(lora_file)[TOKEN], vectors)
    alone = load_embedding(emb_file)  # AUTOMATIC1111's rule: the token is the file's name
    assert alone.token == emb_file.stem and torch.equal(alone.vectors, vectors)
    from safetensors import safe_open

    with safe_open(str(emb_file), "pt") as handle:  # the trained placeholder stays in the metadata
        assert TOKEN in str(handle.metadata())
    # loading the LoRA back gives the trained LoRA tensors (the bundled token is not a LoRA key)
    base = load_base_model(str(base_ckpt))
    load_kohya_lora(
        {k: v for k, v in load_file(str(lora_file)).items() if k.startswith("lora_")}, unet=base.unet
    )
    ours = lora_lib.lora_state_dict(model.unet)
    theirs = lora_lib.lora_state_dict(base.unet)
    assert ours.keys() == theirs.keys() and max_difference(ours, theirs) == 0.0


def test_sample_py_lora_adds_the_bundled_token(trained, base_ckpt, tmp_path):  # noqa: F811
    import sample
    from ldm.models import pipeline
    from ldm.modules.adapters.token_embeddings import placeholder_tokens

    objects, run = trained
    lora_file = run / "adapters" / "pivotal_tuning.safetensors"
    model = pipeline.load_for_sampling(str(base_ckpt), loras=[str(lora_file)])
    encoder = model.text_encoder
    ids = encoder.tokenizer.convert_tokens_to_ids(placeholder_tokens(TOKEN, 2))
    vectors = objects["model"].method.textual_inversion.parameters()[0].detach()
    assert torch.equal(encoder.token_embedding.weight[ids], vectors)
    grid = sample.main(
        [
            *["--ckpt", str(base_ckpt), "--lora", str(lora_file), "--prompt", "a <gem> on a red background"],
            *["--n", "1", "--steps", "2", "--out", str(tmp_path / "samples")],
        ]
    )
    assert grid.is_file()


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, base_ckpt):  # noqa: F811
    # the token stops at step ceil(0.7 x 10) = 7, between the checkpoint of step 8's predecessors and the kill
    args = [
        *pivotal_overrides(base_ckpt),
        *QUIET,
        *SCHEDULE,
        "data.batch_size=2",
        "model.ema_decay=0.9",
        "model.method.ti_stop_fraction=0.7",
    ]
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", KILL_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed, resumed_step = trained_state(tmp_path, [*args, "ckpt_path=last"], "resumed")
    uninterrupted, step = trained_state(tmp_path / "straight", args, "straight")
    assert resumed_step == step == 10
    assert any(k.startswith("method.textual_inversion.") for k in resumed)
    assert any(k.startswith("method.lora.") for k in resumed)
    assert max_difference(resumed, uninterrupted) == 0.0


def test_the_lora_part_takes_every_lora_setting(compose_cfg):
    """model.method.lora is a whole LoRA config: LoCon (ResBlock convolutions too) and the other algorithms
    compose with the token, as model/method=lora's keys do."""
    from hydra.utils import instantiate

    cfg = compose_cfg(
        [
            "experiment=pivotal_tuning",
            "model.method.lora.algo=locon",
            "model.method.lora.conv_rank=2",
            "model.method.lora.conv_alpha=1",
        ]
    )
    method = instantiate(cfg.model.method)
    assert method.lora.algo == "locon"
    assert any("conv" in target for target in method.lora.targets["unet"])
    assert set(compose_cfg(["experiment=lora_finetune"]).model.method) == set(cfg.model.method.lora)
