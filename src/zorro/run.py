"""What train.py and evaluate.py do, as functions of a composed Hydra config (so tests can call them)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError, check_config
from .models import count_parameters
from .preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from .preemption import resolve_ckpt_path
from .tasks import EVAL_INPUTS
from .tasks.base import checkpoint_run

log = logging.getLogger("zorro")


def _fill_run_names(cfg: DictConfig) -> None:
    """W&B run name from the command-line overrides, group from the sweep directory under -m."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    with open_dict(cfg):
        if not cfg.get("run_name"):
            cfg.run_name = hc.job.override_dirname or "default"
        if not cfg.get("group") and hc.mode == RunMode.MULTIRUN:
            cfg.group = "/".join(Path(hc.sweep.dir).parts[-2:])  # e.g. 2026-11-24/12-00-00


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
    if cfg.get("init_from"):  # fine-tuning: the backbone of a train.py checkpoint (e.g. CAV-MAE pre-training)
        log.info("%s: %s", cfg.init_from, init_backbone(backbone, cfg.init_from))
    if compile_wanted(cfg):
        backbone.compile()
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    task = instantiate(cfg.task, backbone=backbone, dataset=datamodule.info, optimizer=instantiate(cfg.optimizer),
                       scheduler=scheduler)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)  # saved in checkpoints for evaluate.py
    task.dataset_info = datamodule.info
    if cfg.get("paths") and cfg.paths.get("output_dir"):
        task.report_dir = str(Path(cfg.paths.output_dir) / "reports")
    return datamodule, task


def compile_wanted(cfg: DictConfig) -> bool:
    """`compile`: true/false, or auto = compile on a GPU trainer (what pays there: fused elementwise work, one
    FlexAttention kernel per layer), not on CPU (compiling costs more than it saves in short runs) nor TPU."""
    value = cfg.get("compile", False)
    if value == "auto":
        return str(cfg.get("trainer", {}).get("accelerator", "")) in ("gpu", "cuda")
    if not isinstance(value, bool):
        raise ConfigError(f"compile: expected true, false or auto, got {value!r}")
    return value


def init_backbone(backbone, path: str):
    """Copy the `backbone.*` weights of a checkpoint into `backbone`; the rest (heads, projectors) and what the
    backbone lacks (a pre-training decoder when it is built without one) are listed as unused in the report."""
    from .models.pretrained import load_into, load_state

    return load_into(backbone, load_state(path),
                     rename=lambda key: key.removeprefix("backbone.") if key.startswith("backbone.") else None)


def build(cfg: DictConfig):
    """Instantiate (datamodule, task, trainer) from a composed config."""
    datamodule, task = build_task(cfg)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    callbacks = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if not c or "_target_" not in c:
            continue
        if name == "lr_monitor" and not loggers:  # LearningRateMonitor refuses to run without a logger
            continue
        callbacks.append(instantiate(c))
    from .callbacks import progress_bar

    show_progress, progress = progress_bar(cfg.get("progress", "auto"), cfg.get("progress_every_n_steps", 50))
    callbacks += progress
    if "SLURMEnvironment" in str(cfg.trainer.get("plugins")) and "SLURM_PROCID" not in os.environ:
        raise ConfigError("trainer=slurm runs in a SLURM job step (srun, or -m hydra/launcher=submitit_slurm_gpu); "
                          "elsewhere use trainer=ddp (docs/cluster_training.md)")
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                          enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                          enable_progress_bar=show_progress, **_sync_batchnorm(cfg.trainer))
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


def train(cfg: DictConfig) -> dict[str, float]:
    _fill_run_names(cfg)
    datamodule, task, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(task.run_config)
    if cfg.get("train", True):
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), trainer))
        except SIGTERMException:  # preempted: PreemptionCheckpoint saved the step and printed how to resume
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
    metrics = _scalars(trainer.callback_metrics)
    settings = task.eval_settings() if hasattr(task, "eval_settings") else None
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test", True) and datamodule.has_split("test") and not trainer.fast_dev_run:
        try:
            trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        except SIGTERMException:  # training had finished: only the test is lost
            print(f"Stopped by SIGTERM while testing; test the best checkpoint with `python evaluate.py "
                  f"ckpt_path={best}`", file=sys.stderr, flush=True)
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        metrics.update(_scalars(trainer.callback_metrics))
        _report(metrics, "test", settings)
    out = Path(cfg.paths.output_dir) if cfg.get("paths") else None
    if cfg.get("linear_probe") and not trainer.fast_dev_run:
        # Table 3's self-supervised columns: linear classifiers on the frozen backbone of the best checkpoint
        if best:
            task.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        split = "test" if datamodule.has_split("test") else "val"
        probe_metrics, settings = run_probe(cfg.probe, datamodule, task.backbone, split,
                                            out / "probe" if out is not None else None)
        metrics.update(probe_metrics)
    if out is not None and out.is_dir():
        saved = {**metrics, **({"eval_settings": settings} if settings else {})}
        (out / "metrics.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
        log.info("run directory: %s", out)
    if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
        log.info("best checkpoint: %s", trainer.checkpoint_callback.best_model_path)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test-set metrics of a checkpoint for A, V and A+V inputs; printed as a table, saved as metrics.json."""
    check_config(cfg, required=("ckpt_path",))
    ckpt = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)
    run = OmegaConf.create(checkpoint_run(ckpt)[0])
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.get("data") or {}).items() if v is not None}
    run.data = OmegaConf.merge(run.data, overrides)
    run.trainer = cfg.trainer
    if "eval_inputs" in run.task:  # supervised checkpoints: how the V / A / A+V settings are evaluated
        with open_dict(run):
            run.task.eval_inputs = list(cfg.eval_inputs)
            for key in ("unimodal_eval", "zero_input"):
                if cfg.get(key) is not None:
                    run.task[key] = cfg[key]
    run.logger, run.callbacks = None, None
    run.pretrained = run.init_from = None  # the checkpoint's weights replace any initialisation (no file reads)
    with open_dict(run):
        run.paths = cfg.paths
    split = cfg.get("split", "test")
    if cfg.get("protocol", "test") == "linear_probe":
        return _linear_probe(cfg, run, ckpt, split)
    datamodule, task, trainer = build(run)
    if not datamodule.has_split(split):
        raise ValueError(f"the data has no {split!r} split")
    run_eval = trainer.test if split == "test" else trainer.validate
    run_eval(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    metrics = _scalars(trainer.callback_metrics)
    settings = task.eval_settings() if hasattr(task, "eval_settings") else None
    _report(metrics, "test" if split == "test" else "val", settings)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = {**metrics, **({"eval_settings": settings} if settings else {})}
    (out / "metrics.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    log.info("metrics written to %s", out / "metrics.json")
    return metrics


def run_probe(probe_cfg: DictConfig, datamodule, backbone, split: str, out: Path | None):
    """The linear-probe protocol on a frozen backbone: (probe/* metrics, the settings of its unimodal columns)."""
    from .probe import linear_probe

    for stage in ("train", split):
        if not datamodule.has_split(stage):
            raise ValueError(f"the linear probe needs a {stage!r} split")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    info = datamodule.info
    kwargs = OmegaConf.to_container(probe_cfg)
    metrics = linear_probe(backbone, datamodule.feature_dataloader("train"), datamodule.feature_dataloader(split),
                           num_classes=info.num_classes, multi_label=info.multi_label, out_dir=out, **kwargs)
    settings = {"zero_input": kwargs.get("zero_input", "normalised"), "unimodal_eval": "zeros",
                "dropped_stream": "none"}
    _report(metrics, "probe", settings)
    return metrics, settings


def _linear_probe(cfg: DictConfig, run: DictConfig, ckpt: dict, split: str) -> dict[str, float]:
    datamodule, task = build_task(run)
    task.load_state_dict(ckpt["state_dict"])
    out = Path(cfg.paths.output_dir)
    metrics, settings = run_probe(cfg.probe, datamodule, task.backbone, split, out)
    (out / "metrics.json").write_text(json.dumps({**metrics, "eval_settings": settings}, indent=2, sort_keys=True))
    log.info("linear-probe metrics and features written to %s", out)
    return metrics


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}


def metric_table(metrics: dict[str, float], stage: str) -> str:
    """Rows: outputs (and their average); columns: V / A / A+V inputs (the paper's Table 3 layout)."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == stage and parts[1] in EVAL_INPUTS:
            cells.setdefault((parts[2], parts[3]), {})[parts[1]] = value
    if not cells:
        return ""
    columns = [("video", "V"), ("audio", "A"), ("audio_video", "A+V")]
    lines = [f"{'output':<10} {'metric':<6} " + " ".join(f"{c:>7}" for _, c in columns)]
    order = {"audio": 0, "video": 1, "fusion": 2, "global": 3, "avg": 4}
    for (name, metric), row in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        values = " ".join(f"{100 * row[c]:7.1f}" if c in row else f"{'-':>7}" for c, _ in columns)
        lines.append(f"{name:<10} {metric:<6} {values}")
    return "\n".join(lines)


def table3_line(metrics: dict[str, float], stage: str, settings: dict | None = None) -> str:
    """The run's row of the paper's Table 3 (V / A / A+V, read as the paper reads them) and what it means."""
    from .report import COLUMNS, caption, column_value, metric_name

    metric = metric_name(metrics, stage)
    if metric is None:
        return ""
    cells = [column_value(metrics, stage, inputs, "own", metric) for inputs, _ in COLUMNS]
    row = "  ".join(f"{label} {'-' if v is None else f'{100 * v:.1f}'}" for (_, label), v in zip(COLUMNS, cells))
    return f"Table 3 ({metric}, %): {row}\n  ({caption('own', settings, stage)})"


def _report(metrics: dict[str, float], stage: str, settings: dict | None = None) -> None:
    table = metric_table(metrics, stage)
    if table:
        print(f"\n{stage} metrics (%), by output and input modalities:\n{table}\n", flush=True)
        print(table3_line(metrics, stage, settings) + "\n", flush=True)
    recall = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{stage}/") and "_R@" in k}
    if recall:  # contrastive runs: retrieval between the audio and video embeddings
        print(f"\n{stage} retrieval (%): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(recall.items())),
              flush=True)
