"""Train any model of this project: ``python train.py experiment=vae`` (see README's cookbook).

Hydra composes ``conf/train.yaml``; this script instantiates the datamodule, model, callbacks, loggers
and Trainer, fits (optionally resuming with ``ckpt_path=<file>`` or ``ckpt_path=last``), tests when
asked, and returns ``optimized_metric`` for Hydra sweeps (``-m``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ldm.utils.threads import thread_env

os.environ.update(thread_env())  # before torch loads OpenMP, which reads it once (docs/scale.md: Threads)

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from callbacks.adaptive_threads import AdaptiveThreadsCallback
from ldm.models.safe_checkpoint_io import checkpoint_plugins, explain_resume_mismatch
from ldm.modules.clip_run import pin_clip_runs
from ldm.utils.config_check import check_config_values
from ldm.utils.config_paths import absolute_local_paths
from ldm.utils.config_tree import print_config_tree
from ldm.utils.data_handover import connect_data
from ldm.utils.instantiate import drop_callbacks_needing_a_logger, instantiate_callbacks, instantiate_loggers
from ldm.utils.logging import get_logger
from ldm.utils.quiet import quiet_known_noise
from ldm.utils.run_summary import summarize_run
from ldm.utils.runs import configure_wandb_mode, describe_resume, register_resolvers, resolve_ckpt_path
from ldm.utils.stale_files import clean_run_folders
from ldm.utils.task import renamed_override, run_task
from ldm.utils.threads import describe, may_adapt, ranks_on_host, set_interop_threads, share_cores

log = get_logger(__name__)
register_resolvers()  # ${run_suffix:} in conf/hydra: run folders never collide


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit (and optionally test) the configured model. Returns (metrics, objects)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("extras", {}).get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.extras.matmul_precision)
    configure_wandb_mode()
    check_config_values(cfg)  # trainer.max_steps=abc: named here, not deep inside Lightning
    ckpt_path = resolve_ckpt_path(
        cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, cfg.paths.output_dir
    )
    if ckpt_path and str(cfg.get("ckpt_path")) == "last":
        log.info(describe_resume(ckpt_path, cfg.task_name))
    # temporary files of killed writes (README: Reliability)
    clean_run_folders(cfg.paths.output_dir, ckpt_path)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    log.info(f"Instantiating model <{cfg.model._target_}>")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    # checkpoints describe themselves, their local files by absolute path (loadable from any directory)
    model.model_config = absolute_local_paths(OmegaConf.to_container(cfg.model, resolve=True))
    model.model_config = pin_clip_runs(model.model_config, model)  # the CLIP folder used, not "the newest"
    connect_data(model, datamodule)  # facts to the model, services to the data: neither holds the other
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = drop_callbacks_needing_a_logger(callbacks, loggers)
    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=checkpoint_plugins(cfg.trainer)
    )
    ranks = ranks_on_host(trainer)
    share_cores(ranks)  # DDP ranks on one machine split its cores
    if ranks == 1 and may_adapt():  # one process with the cores to itself: follow the machine's load
        trainer.callbacks.append(AdaptiveThreadsCallback())
    set_interop_threads()
    log.info(describe())

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.monotonic()
    if cfg.get("train", True):
        if ckpt_path:
            log.info(f"Resuming from {ckpt_path}")
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except RuntimeError as error:  # a checkpoint of another architecture: one line, not one per key
            explained = explain_resume_mismatch(error, ckpt_path, model)
            if explained is None:
                raise
            raise explained from error
    metrics = dict(trainer.callback_metrics)

    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(trainer.callback_metrics)

    log.info(summarize_run(trainer, model, cfg, time.monotonic() - started))
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def metric_value(metrics: dict, name: str | None) -> float | None:
    """The value Hydra sweepers optimise (None, with a warning naming what was logged, when absent)."""
    if not name:
        return None
    if name not in metrics:
        log.warning(
            f"optimized_metric={name!r} was not logged (no validation ran?); logged: {sorted(metrics)}"
        )
        return None
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    quiet_known_noise()
    return run_task(print_and_train, cfg)


def print_and_train(cfg: DictConfig) -> float | None:
    """``main`` inside ``run_task``: a read-only run folder fails on ``config_tree.log`` as one line too."""
    if cfg.get("extras", {}).get("print_config", True):
        print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    metrics, _ = train(cfg)
    value = metric_value(metrics, cfg.get("optimized_metric"))
    if value is not None:
        log.info(f"optimized_metric {cfg.optimized_metric} = {value:.6g}")
    return value


if __name__ == "__main__":
    if renamed := renamed_override(sys.argv[1:]):  # before Hydra, whose message would not name the new key
        print(renamed, file=sys.stderr)
        raise SystemExit(1)
    main()
