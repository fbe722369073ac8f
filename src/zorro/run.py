"""What train.py and evaluate.py do, as functions of a composed Hydra config (so tests can call them)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from . import known_warnings, preemption
from .checkpoint import checkpoint_run, dataset_dict, describe, load_checkpoint, rebuild_config
from .config import check_config, job_overrides
from .errors import ConfigError, DataError
from .eval.tables import metric_table, table3_line
from .models import count_parameters

log = logging.getLogger("zorro")
known_warnings.install()


def _log_once() -> None:
    """The `lightning` package logs through its own console handler and also to the root logger, which Hydra
    configures (console + the run's .log file): every Lightning line would appear twice. Keep Hydra's."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


def _fill_run_names(cfg: DictConfig) -> None:
    """W&B run name and group. Under -m: each job is named by its swept overrides (`masking=zorro`; the rest are in
    its .hydra/overrides.yaml) and grouped by its sweep (the sweep directory, e.g. 2026-11-24/12-00-00); a single
    run is named by its command-line overrides."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    with open_dict(cfg):
        if not cfg.get("run_name"):
            if multirun:
                pairs = job_overrides(hc.overrides.task, hc.sweep.dir, hc.job.config.override_dirname.exclude_keys)
                cfg.run_name = " ".join(f"{k}={v}" for k, v in pairs) or f"job {hc.job.num}"
            else:
                cfg.run_name = hc.job.override_dirname or "default"
        if not cfg.get("group") and multirun:
            cfg.group = "/".join(Path(hc.sweep.dir).parts[-2:])  # e.g. 2026-11-24/12-00-00


def finish_loggers(trainer: pl.Trainer | None, failed: bool = False) -> None:
    """End this run's W&B run. Lightning's WandbLogger never finishes the run it starts, so the next job of a sweep
    that runs in the same process (Hydra's basic launcher) would be logged into it ("a wandb run already in
    progress ... will reuse this run"): one run would hold every job's metrics and the later jobs none of their own."""
    for logger in (trainer.loggers if trainer is not None else []):
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # rank 0, and only if it started
            logger._experiment.finish(exit_code=1 if failed else 0)
            logger._experiment = None


def build_task(cfg: DictConfig):
    """Instantiate (datamodule, task) from a composed config."""
    check_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as e:  # e.g. an unreachable data.root: a one-line error, not Hydra's wrapper
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
    check_modalities(cfg, datamodule)
    try:
        backbone = instantiate(cfg.model)
    except InstantiationException as e:  # a constructor's validation (a bad routing table, a masking the
        if isinstance(e.__cause__, ValueError):  # backbone lacks): one line, not Hydra's wrapper
            raise ConfigError(f"model: {e.__cause__}") from None
        raise
    log.info("backbone %s (masking=%s): %.2fM parameters", type(backbone).__name__,
             getattr(getattr(backbone, "routing", None), "name", "-"), count_parameters(backbone) / 1e6)
    if cfg.get("pretrained"):  # ImageNet / MAE initialisation from a local file, with a report of what loaded
        if not hasattr(backbone, "load_pretrained"):
            raise ConfigError(f"pretrained: {type(backbone).__name__} has no ImageNet initialisation")
        log.info("%s: %s", cfg.pretrained, backbone.load_pretrained(cfg.pretrained))
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    # (partial, then called: Hydra's instantiate reserves the keyword `config`); the resolved config and the
    # dataset info become the task's saved hyper-parameters, so every checkpoint can rebuild its run
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(
        backbone=backbone, optimizer=instantiate(cfg.optimizer), scheduler=scheduler,
        config=OmegaConf.to_container(cfg, resolve=True), dataset=dataset_dict(datamodule.info))
    if cfg.get("init_from"):  # fine-tuning: a train.py checkpoint's backbone, or an official release file
        log.info("%s: %s", cfg.init_from, init_backbone(backbone, cfg.init_from, heads=getattr(task, "heads", None)))
    if compile_wanted(cfg):
        backbone.compile()
    return datamodule, task


# Recipes for data with one modality, named when a config asks for the other one.
ONE_MODALITY_RECIPES = {"audio": "experiment=esc50_scratch", "video": "experiment=k400_video"}


def check_modalities(cfg: DictConfig, datamodule) -> None:
    """A run that needs a modality its data lacks stops here with one line: the shards' manifest counts the clips
    with audio and with video. A run needs what it reads (data.modalities) and what it scores (task.eval_inputs:
    audio_video needs both; tasks without them, contrastive and CAV-MAE, pair the two)."""
    counts = datamodule.modality_counts() if hasattr(datamodule, "modality_counts") else None
    if not counts:
        return
    reads = set(cfg.data.get("modalities") or ("audio", "video"))
    scores = cfg.task.get("eval_inputs")
    needs = reads | ({m for inputs in scores for m in str(inputs).split("_")} if scores is not None
                     else {"audio", "video"})
    absent = [m for m in ("audio", "video") if counts[m] == 0 and m in needs]
    if not absent:
        return
    m = absent[0]
    present = "audio" if m == "video" else "video"
    asked = f"data.modalities={sorted(reads)}" + (f", task.eval_inputs={list(scores)}" if scores is not None else
                                                   f", {cfg.task._target_.rsplit('.', 1)[-1]} (pairs both)")
    raise ConfigError(f"data: no clip of {cfg.data.get('root', 'the data')} has {m} (its manifest: {present} in "
                      f"{counts[present]} clips, {m} in 0) but this run needs it ({asked}); for {present}-only data "
                      f"use {ONE_MODALITY_RECIPES[present]}, or data.modalities=[{present}] "
                      f"task.eval_inputs=[{present}]".replace("'", ""))


def compile_wanted(cfg: DictConfig) -> bool:
    """`compile`: true/false, or auto = compile on a GPU trainer (what pays there: fused elementwise work, one
    FlexAttention kernel per layer), not on CPU (compiling costs more than it saves in short runs) nor TPU."""
    value = cfg.get("compile", False)
    if value == "auto":
        return str(cfg.get("trainer", {}).get("accelerator", "")) in ("gpu", "cuda")
    if not isinstance(value, bool):
        raise ConfigError(f"compile: expected true, false or auto, got {value!r}")
    return value


def init_backbone(backbone, path: str, heads=None):
    """Copy the `backbone.*` weights of a train.py checkpoint into `backbone`; the rest (the source run's heads,
    projectors) and what the backbone lacks (a pre-training decoder when it is built without one) are listed as
    unused in the report. A file without `backbone.*` keys is an official release in the backbone's own layout,
    read by its `load_official` (CAV-MAE: a fine-tuned release also fills `heads`). A file of which no tensor
    fits is a one-line error (image weights go through `pretrained=`, which converts them)."""
    from .models.pretrained import LoadReport, Unused, load_into, load_state

    state = load_state(path)
    if any(k.startswith("backbone.") for k in state):
        report = load_into(backbone, state, rename=lambda key: key.removeprefix("backbone.") if key.startswith(
            "backbone.") else Unused("not the backbone (the source run's heads / projectors)"))
    elif hasattr(backbone, "load_official"):
        report = backbone.load_official(state, heads=heads)
    else:
        report = LoadReport()
    if not report.loaded:
        keys = ", ".join(list(state)[:3])
        raise ConfigError(f"init_from: none of the {len(state)} tensors of {path} fits {type(backbone).__name__} "
                          f"(keys like {keys}); give a train.py checkpoint of this model or its official release "
                          "(image weights: pretrained=)")
    return report


def build(cfg: DictConfig):
    """Instantiate (datamodule, task, trainer) from a composed config."""
    datamodule, task = build_task(cfg)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger._wandb_init = known_warnings.wandb_init_kwargs(logger._wandb_init)
    callbacks = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if not c or "_target_" not in c:
            continue
        if name == "lr_monitor" and not loggers:  # LearningRateMonitor refuses to run without a logger
            continue
        callbacks.append(instantiate(c))
    from .callbacks import LogEveryEpoch, progress_bar

    show_progress, progress = progress_bar(cfg.get("progress", "auto"), cfg.get("progress_every_n_steps", 50))
    callbacks += [*progress, LogEveryEpoch()]
    if not datamodule.has_split("val"):  # nothing to monitor: no best-*.ckpt (and no "could not find val/score")
        callbacks = [c for c in callbacks if not (isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor)]
    if "SLURMEnvironment" in str(cfg.trainer.get("plugins")) and "SLURM_PROCID" not in os.environ:
        raise ConfigError("trainer=slurm runs in a SLURM job step (srun, or -m hydra/launcher=submitit_slurm_gpu); "
                          "elsewhere use trainer=ddp (docs/cluster_training.md)")
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                          enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                          enable_progress_bar=show_progress, **_sync_batchnorm(cfg.trainer))
    preemption.use_atomic_checkpoints(trainer)
    return datamodule, task, trainer


def _sync_batchnorm(trainer_cfg: DictConfig) -> dict:
    """SyncBatchNorm only runs on CUDA: trainer=ddp keeps it on GPUs and drops it for CPU (gloo) runs."""
    if not trainer_cfg.get("sync_batchnorm"):
        return {}
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return {}
    log.info("sync_batchnorm off: SyncBatchNorm needs CUDA (accelerator=%s)", accelerator)
    return {"sync_batchnorm": False}


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Fit, test and (linear_probe) probe the run `cfg` composes. With ckpt_path, the run is the checkpoint's,
    with `overrides` (the command line's: train.py passes Hydra's; outside Hydra's app, the caller's) on top."""
    _log_once()
    cfg = resume_config(cfg, overrides)
    _fill_run_names(cfg)
    datamodule, task, trainer = build(cfg)  # the loggers get the task's hyper-parameters from Lightning
    if cfg.get("train", True) and not datamodule.has_split("val"):
        last = next((Path(c.dirpath) / f"{c.filename}.ckpt" for c in trainer.checkpoint_callbacks
                     if isinstance(c, pl.callbacks.ModelCheckpoint) and c.dirpath and c.filename), None)
        log.warning("no validation split (data has no %r samples): no validation and no best-*.ckpt; the test "
                    "uses the last weights (%s)", _val_split_name(cfg), last or "no checkpoint written")
    failed = True
    try:
        metrics = _train(cfg, datamodule, task, trainer)
        failed = False
        return metrics
    finally:  # this job's W&B run ends with it (the next job of a sweep gets its own)
        finish_loggers(trainer, failed)


def _train(cfg: DictConfig, datamodule, task, trainer: pl.Trainer) -> dict[str, float]:
    if cfg.get("train", True):
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException:  # preempted: PreemptionCheckpoint saved where it stopped and printed how to resume
            raise SystemExit(preemption.stop(trainer)) from None
    metrics = _scalars(trainer.callback_metrics)
    settings = task.eval_settings() if hasattr(task, "eval_settings") else None
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test", True) and datamodule.has_split("test") and not trainer.fast_dev_run:
        try:
            trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        except SIGTERMException:  # training had finished: only the test is lost
            print(f"Stopped by SIGTERM while testing; test the best checkpoint with `python evaluate.py "
                  f"ckpt_path={best}`", file=sys.stderr, flush=True)
            raise SystemExit(preemption.stop(trainer)) from None
        metrics.update(_scalars(trainer.callback_metrics))
        check_scored(datamodule, trainer, metrics, "test", "test")
        _report(metrics, "test", settings)
    out = Path(cfg.paths.output_dir) if cfg.get("paths") else None
    if cfg.get("linear_probe") and not trainer.fast_dev_run:
        # Table 3's self-supervised columns: linear classifiers on the frozen backbone of the best checkpoint
        if best:
            task.load_state_dict(load_checkpoint(best)[0]["state_dict"])
        split = "test" if datamodule.has_split("test") else "val"
        probe_metrics, settings = run_probe(cfg.probe, datamodule, trainer, task, split,
                                            out / "probe" if out is not None else None)
        metrics.update(probe_metrics)
    if out is not None and out.is_dir() and trainer.is_global_zero:  # one writer under DDP
        _save_metrics(out, metrics, settings)
    if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
        log.info("best checkpoint: %s", trainer.checkpoint_callback.best_model_path)
    return metrics


def _val_split_name(cfg: DictConfig) -> str:
    return str((cfg.get("data") or {}).get("val_split") or "val")


# What a resumed train.py takes from its own command rather than from the checkpoint.
TRAIN_OWN = ("paths", "logger", "callbacks", "progress", "progress_every_n_steps")


def resume_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """`ckpt_path=PATH` or `ckpt_path=auto` (the newest loadable checkpoint under the run directory, i.e.
    `hydra.run.dir=<run> ckpt_path=auto`): the run is rebuilt from the checkpoint's saved config with `overrides`
    on top (zorro.checkpoint.rebuild_config; printed), its folder, loggers and callbacks `cfg`'s. Without a
    checkpoint (auto in a new folder): `cfg` as composed."""
    path = preemption.resolve_ckpt_path(cfg.get("ckpt_path"), cfg)
    if not path:
        with open_dict(cfg):
            cfg.ckpt_path = None
        return cfg
    _, saved = load_checkpoint(path, mmap=True)
    rebuilt = rebuild_config(saved, overrides, cfg, own=TRAIN_OWN)
    run = rebuilt.config
    with open_dict(run):
        run.ckpt_path = str(path)
    dirs, _ = preemption.checkpoint_dirs(run)
    elsewhere = Path(path).resolve().parent not in {d.resolve() for d in dirs}
    log.info("resuming %s with the run's config from the checkpoint%s%s", path, describe(rebuilt),
             f"; new checkpoints go to {dirs[0]} (best-* among the epochs from here on; to go on in the run's own "
             f"folder: hydra.run.dir=<that folder> ckpt_path=auto)" if elsewhere and dirs else "")
    return run


# What an evaluation takes from its own command (evaluate.yaml), and its settings that are not the run's.
EVAL_OWN = ("paths", "logger", "callbacks", "group", "tags", "progress", "progress_every_n_steps", "trainer")
EVAL_SETTINGS = ("split", "protocol", "probe", "eval_inputs", "zero_input", "unimodal_eval", "run_name")


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Test-set metrics of a checkpoint for A, V and A+V inputs; printed as a table, saved as metrics.json,
    the run reports written by the RunReports callback (evaluate.yaml `callbacks`), logged by `logger=...`.
    The run is the checkpoint's with `overrides` on top (the command line's: evaluate.py passes Hydra's; outside
    Hydra's app, the caller's), e.g. data.root=DIR: zorro.checkpoint.rebuild_config."""
    _log_once()
    check_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "data"]))  # data: checked once merged
    ckpt, saved = load_checkpoint(cfg.ckpt_path)
    rebuilt = rebuild_config(saved, overrides, cfg, own=EVAL_OWN, command_keys=EVAL_SETTINGS)
    log.info("evaluating %s with the run's config from the checkpoint%s", cfg.ckpt_path, describe(rebuilt))
    run = rebuilt.config
    with open_dict(run):
        if "eval_inputs" in run.task:  # supervised checkpoints: how the V / A / A+V settings are evaluated
            if cfg.get("eval_inputs") is not None:  # (null: the checkpoint's own, e.g. [audio] for ESC-50)
                run.task.eval_inputs = list(cfg.eval_inputs)
            for key in ("unimodal_eval", "zero_input"):
                if cfg.get(key) is not None:
                    run.task[key] = cfg[key]
        # the evaluation's own name (its loggers and callbacks, from evaluate.yaml, interpolate it)
        run.run_name = cfg.get("run_name") or f"eval-{run.get('run_name') or 'run'}"
    split = cfg.get("split", "test")
    if cfg.get("protocol", "test") == "linear_probe":
        return _linear_probe(cfg, run, ckpt, split)
    datamodule, task, trainer = build(run)
    failed = True
    try:
        metrics = _evaluate(cfg, ckpt, split, datamodule, task, trainer)
        failed = False
        return metrics
    finally:
        finish_loggers(trainer, failed)


def _evaluate(cfg: DictConfig, ckpt: dict, split: str, datamodule, task, trainer: pl.Trainer) -> dict[str, float]:
    if not datamodule.has_split(split):
        have = sorted(getattr(datamodule, "manifest", {}).get("splits", {}))
        raise ConfigError(f"split: the data has no {split!r} split" + (f" (it has {', '.join(have)})" if have else ""))
    check_classes(checkpoint_run(ckpt)[1], datamodule.info)
    for logger in trainer.loggers:
        logger.log_hyperparams({"ckpt_path": str(cfg.ckpt_path), "split": split, **checkpoint_run(ckpt)[0]})
    run_eval = trainer.test if split == "test" else trainer.validate
    run_eval(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    metrics = _scalars(trainer.callback_metrics)
    settings = task.eval_settings() if hasattr(task, "eval_settings") else None
    check_scored(datamodule, trainer, metrics, "test" if split == "test" else "val", split)
    _report(metrics, "test" if split == "test" else "val", settings)
    if trainer.is_global_zero:
        _save_metrics(Path(cfg.paths.output_dir), metrics, settings)
    return metrics


def check_classes(trained, data) -> None:
    """The checkpoint's classes are the data's, in the same order (else every score compares other classes)."""
    if trained is None or not trained.class_names or not data.class_names or trained.class_names == data.class_names:
        return
    a, b = list(trained.class_names), list(data.class_names)
    only = lambda x, y: ", ".join([c for c in x if c not in y][:5]) or "none"  # noqa: E731
    what = (f"the same {len(a)} classes in another order" if sorted(a) == sorted(b) else
            f"only in the checkpoint: {only(a, b)}; only in the data: {only(b, a)}")
    raise ConfigError(f"the checkpoint was trained on {len(a)} classes, data.root has {len(b)} ({what}); "
                      f"evaluate on shards written with the checkpoint's class list")


def check_scored(datamodule, trainer, metrics: dict[str, float], stage: str, split: str) -> None:
    """An evaluation scored every clip its split holds: a shard that ended early or unreadable clips would
    otherwise give a score over part of the split (the warnings above name them)."""
    expected = datamodule.split_size(split) if hasattr(datamodule, "split_size") else 0
    limit = trainer.limit_test_batches if stage == "test" else trainer.limit_val_batches
    if not expected or limit != 1.0:  # trainer.limit_*_batches asked for part of the split
        return
    scored = int(metrics.get(f"{stage}/num_clips", 0))
    if scored < expected:
        raise DataError(f"the {split!r} evaluation scored {scored} of the {expected} clips its manifest lists: "
                        f"shards or clips were unreadable (the warnings above name them); no {stage} metrics "
                        f"are reported")


def _save_metrics(out: Path, metrics: dict[str, float], settings: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    saved = {**metrics, **({"eval_settings": settings} if settings else {})}
    (out / "metrics.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    log.info("metrics written to %s", out / "metrics.json")


def run_probe(probe_cfg: DictConfig, datamodule, trainer: pl.Trainer, task, split: str, out: Path | None):
    """The linear-probe protocol on the task's frozen backbone, its features extracted by `trainer.predict`:
    (probe/* metrics, the settings of its unimodal columns)."""
    from .eval.probe import linear_probe

    for stage in ("train", split):
        if not datamodule.has_split(stage):
            raise ConfigError(f"the linear probe needs a {stage!r} split")
    if out is not None and trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
    info = datamodule.info
    kwargs = OmegaConf.to_container(probe_cfg)
    metrics = linear_probe(trainer, task, datamodule.feature_dataloader("train"), datamodule.feature_dataloader(split),
                           num_classes=info.num_classes, multi_label=info.multi_label, out_dir=out, **kwargs)
    settings = {"zero_input": kwargs.get("zero_input", "normalised"), "unimodal_eval": "zeros",
                "dropped_stream": "none"}
    if trainer.is_global_zero:
        _report(metrics, "probe", settings)
    return metrics, settings


def _linear_probe(cfg: DictConfig, run: DictConfig, ckpt: dict, split: str) -> dict[str, float]:
    datamodule, task, trainer = build(run)
    failed = True
    try:
        task.load_state_dict(ckpt["state_dict"])
        out = Path(cfg.paths.output_dir)
        metrics, settings = run_probe(cfg.probe, datamodule, trainer, task, split, out)
        if trainer.is_global_zero:
            _save_metrics(out, metrics, settings)
            log.info("linear-probe features written to %s", out / "features")
        failed = False
        return metrics
    finally:
        finish_loggers(trainer, failed)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}


def _report(metrics: dict[str, float], stage: str, settings: dict | None = None) -> None:
    table = metric_table(metrics, stage)
    if table:
        print(f"\n{stage} metrics (%), by output and input modalities:\n{table}\n", flush=True)
        print(table3_line(metrics, stage, settings) + "\n", flush=True)
    recall = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{stage}/") and "_R@" in k}
    if recall:  # contrastive runs: retrieval between the audio and video embeddings
        print(f"\n{stage} retrieval (%): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(recall.items())),
              flush=True)
