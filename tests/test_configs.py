"""Every option of every config group composes with the values its file sets and passes the config check (each
key a parameter of its _target_); the groups a run builds (model x masking, trainer, logger, callbacks, optimizer,
scheduler, task, data) instantiate, option by option, into objects that carry those settings."""

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from zorro.config import ConfigError, check_config
from zorro.run import build

from .conftest import CONF, compose_cfg
from .data.conftest import make_clips, write_shards

DATA_ROOTS = {"shards": ["data.root"], "mixed": ["data.audio_root", "data.video_root"]}  # -> a tiny shard folder


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = ["model", "masking", "task", "data", "trainer", "optimizer", "scheduler", "logger", "callbacks",
          "debug", "experiment"]


def own_values(group: str, option: str) -> tuple[str, dict]:
    """(package, {dotted key: value}) that the option file sets itself: its literal leaves, not its defaults
    list, interpolations or required (???) values."""
    path = CONF / group / f"{option}.yaml"
    header = next((line.split()[-1] for line in path.read_text().splitlines() if line.startswith("# @package")), group)
    package = "" if header == "_global_" else header
    node = OmegaConf.load(path)
    node.pop("defaults", None)

    def leaves(n, prefix):
        for key in n:
            full = f"{prefix}.{key}" if prefix else str(key)
            if OmegaConf.is_interpolation(n, key) or OmegaConf.is_missing(n, key):
                continue
            if isinstance(n[key], DictConfig):
                yield from leaves(n[key], full)
            else:
                yield full, OmegaConf.to_container(n[key]) if OmegaConf.is_config(n[key]) else n[key]

    return package, dict(leaves(node, ""))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_with_its_own_values(group, option, tmp_path):
    cfg = compose_cfg(overrides=[f"{group}={option}"], output_dir=tmp_path)
    package, values = own_values(group, option)
    for key, value in values.items():
        full = f"{package}.{key}" if package else key
        if full.startswith("hydra."):
            continue  # not part of the job's config
        composed = OmegaConf.select(cfg, full, throw_on_missing=False)
        composed = OmegaConf.to_container(composed) if OmegaConf.is_config(composed) else composed
        assert composed == value, f"{group}={option}: {full} is {composed!r}, the file sets {value!r}"
    try:
        check_config(cfg)  # every key is a parameter of its _target_, with the type it takes
    except ConfigError as e:  # a recipe that needs a path (init_from, pretrained, data.root): check the rest
        if not str(e).startswith("missing value for "):
            raise
        for key in str(e).removeprefix("missing value for ").split(" (")[0].split(":")[0].split(", "):
            OmegaConf.update(cfg, key, "placeholder", force_add=True)
        check_config(cfg)


# What each tiny backbone produces (a routing table's outputs: two_streams keeps audio and video only).
ZORRO_OUTPUTS = {"two_streams": ("audio", "video")}
FIXED_OUTPUTS = {"MBT": ("audio", "video"), "CAVMAE": ("audio", "video", "global")}
OUTPUT_DIM = {"zorro_vit": lambda m: m.dim, "mbt": lambda m: m.dim, "cav_mae": lambda m: m.dim,
              "zorro_hip": lambda m: m.dims[-1] if m.decoder else m.dims[len(m.dims) // 2],  # HiP's processor
              "zorro_swin": lambda m: m.embed_dim * 2 ** (len(m.depths) - 1)}


TINY = [m for m in options("model") if m.endswith("_tiny")]
ZORRO_TINY = [m for m in TINY if m.startswith("zorro_")]  # the rest (MBT, CAV-MAE) have no masking option


@pytest.mark.parametrize("model,masking", [(m, k) for m in ZORRO_TINY for k in options("masking")]
                         + [(m, k) for m in TINY if m not in ZORRO_TINY for k in (None, "zorro")])
def test_models_instantiate_with_every_masking(model, masking, tmp_path):
    """Base sizes are instantiated by tests/models (parameter counts); here every tiny Zorro model x masking, and
    the baselines (their own fixed fusion) as configured and refusing a masking."""
    cfg = compose_cfg(overrides=[f"model={model}", *([f"masking={masking}"] if masking else [])], output_dir=tmp_path)
    cls = get_class(cfg.model._target_)
    if masking and not hasattr(cls, "maskings"):  # baselines (MBT, CAV-MAE) have their own fixed fusion
        with pytest.raises(ConfigError, match="model.masking"):
            check_config(cfg)
        return
    if masking and masking not in cls.maskings:
        with pytest.raises(ConfigError, match=f"model.masking: {cls.__name__} implements"):
            check_config(cfg)
        return
    check_config(cfg)
    backbone = instantiate(cfg.model)
    assert type(backbone) is cls and backbone.output_dim == OUTPUT_DIM[model.removesuffix("_tiny")](cfg.model)
    if hasattr(cls, "maskings"):
        assert backbone.routing.name == cfg.model.masking == (masking or cfg.model.masking)
        expected = ZORRO_OUTPUTS.get(cfg.model.masking, ("audio", "video", "fusion", "global"))
    else:
        expected = FIXED_OUTPUTS[cls.__name__]
    assert backbone.output_names == expected


def _carried(obj, node) -> dict:
    """The config keys `obj` keeps as attributes of the same name, with their values (lists as tuples)."""
    plain = lambda v: tuple(v) if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v  # noqa: E731
    return {k: (plain(getattr(obj, k)), plain(OmegaConf.to_container(node[k]) if OmegaConf.is_config(node[k])
                                              else node[k]))
            for k in node if not str(k).startswith("_") and hasattr(obj, k)}


def check_group(group: str, cfg, datamodule, task, trainer) -> None:
    """What the group's option set is what the built objects have."""
    if group == "trainer":
        for key in ("max_epochs", "max_steps", "accumulate_grad_batches", "log_every_n_steps",
                    "check_val_every_n_epoch", "gradient_clip_val"):
            assert getattr(trainer, key) == cfg.trainer[key], key
        assert trainer.precision == cfg.trainer.precision and type(trainer.accelerator).__name__ == "CPUAccelerator"
        assert ("DDP" in type(trainer.strategy).__name__) == (cfg.trainer.get("strategy") == "ddp")
    elif group == "logger":
        configured = sorted(get_class(c._target_).__name__ for c in (cfg.logger or {}).values())
        assert sorted(type(lg).__name__ for lg in trainer.loggers) == configured
        for lg, c in zip(trainer.loggers, (cfg.logger or {}).values()):
            if "save_dir" in c:
                assert lg.save_dir == c.save_dir
    elif group == "callbacks":
        configured = [c for c in (cfg.callbacks or {}).values() if c and "_target_" in c]
        assert configured or trainer.checkpoint_callback is None  # callbacks=none: nothing saved
        have = [type(c).__name__ for c in trainer.callbacks]
        for c in configured:
            assert get_class(c._target_).__name__ in have, c._target_
        for ckpt in trainer.checkpoint_callbacks:
            c = next(c for c in configured if c.get("filename") == ckpt.filename)
            assert (ckpt.dirpath, ckpt.monitor) == (c.dirpath, c.monitor)
    elif group == "optimizer":
        factory = task.optimizer_factory
        optimizer = factory(task.parameters())
        assert type(optimizer) is get_class(cfg.optimizer._target_)
        for key, value in cfg.optimizer.items():
            if key in optimizer.param_groups[0]:
                got = optimizer.param_groups[0][key]
                assert (tuple(got) if isinstance(got, tuple) else got) == (tuple(value) if OmegaConf.is_config(
                    value) else value), key
    elif group == "scheduler":
        optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
        scheduler = task.scheduler_factory(optimizer, total_steps=100)
        lrs = []
        for _ in range(100):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        warmup = cfg.scheduler.warmup_steps or int(cfg.scheduler.warmup_fraction * 100)
        assert max(lrs) == pytest.approx(1.0, abs=0.02) and lrs[warmup // 2] < lrs[warmup]  # warm-up, then decay
        assert lrs[-1] == pytest.approx(cfg.scheduler.min_lr_ratio, abs=0.01)
    elif group == "task":
        assert type(task) is get_class(cfg.task._target_)
        carried = _carried(task, cfg.task)
        assert carried and all(a == b for a, b in carried.values()), carried
    elif group == "data":
        assert type(datamodule) is get_class(cfg.data._target_) and datamodule.info.num_classes > 0
        carried = _carried(datamodule, cfg.data)
        assert carried and all(a == b for a, b in carried.values()), carried


@pytest.mark.parametrize("group,option", [(g, o) for g in ["trainer", "logger", "callbacks", "optimizer",
                                                           "scheduler", "task", "data"] for o in options(g)])
def test_group_options_instantiate_with_their_settings(group, option, tmp_path):
    if option in ("tpu", "slurm"):
        pytest.skip("needs torch_xla: tests/test_xla.py; a SLURM job: tests/test_preemption.py")
    base = ["debug=tiny"]  # its data sizes are synthetic's: shard data runs the tiny model on a tiny shard folder
    if group == "data" and option in DATA_ROOTS:
        write_shards(tmp_path / "shards", {"train": [make_clips("tr", 2)], "val": [make_clips("va", 1)]})
        base = ["model=zorro_vit_tiny", *(f"{key}={tmp_path / 'shards'}" for key in DATA_ROOTS[option])]
    extra = ["trainer.accelerator=cpu"] if (group, option) in {("trainer", "gpu"), ("trainer", "ddp")} else []
    model = ["model=cav_mae_tiny"] if option == "cav_mae_pretrain" or option == "cav_mae" else []
    cfg = compose_cfg(overrides=[*base, f"{group}={option}", *extra, *model], output_dir=tmp_path)
    datamodule, task, trainer = build(cfg)
    check_group(group, cfg, datamodule, task, trainer)


def test_config_checks_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model.depth: expected int, got 'abc'"):
        check_config(compose_cfg(overrides=["model.depth=abc"], output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"did you mean 'depth'"):
        check_config(compose_cfg(overrides=["+model.deph=3"], output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"missing value for data.root"):
        check_config(compose_cfg(overrides=["data=shards"], output_dir=tmp_path))


def test_custom_masking_from_the_command_line_trains(tmp_path):
    """masking=custom with a non-contiguous table (audio reads video): composed, checked, one fast_dev_run step."""
    from hydra.errors import InstantiationException

    from zorro.run import train

    reads = "masking.reads={audio:[audio,video],fusion:[audio,fusion,video],video:[video]}"
    cfg = compose_cfg(overrides=["debug=tiny", "trainer.fast_dev_run=true", "masking=custom", reads],
                      output_dir=tmp_path)
    check_config(cfg)
    backbone = instantiate(cfg.model)
    assert backbone.routing.name == "custom" and backbone.routing.reads["audio"] == ("audio", "video")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/score" in metrics  # a step and a validation
    bad = compose_cfg(overrides=["debug=tiny", "masking=custom", "masking.reads={audio:[video],video:[video]}"],
                      output_dir=tmp_path)
    with pytest.raises(InstantiationException, match=r"group 'audio' must read itself"):
        instantiate(bad.model)
    with pytest.raises(ConfigError, match=r"^model: routing row 'audio': group 'audio' must read itself"):
        train(bad)  # train.py prints it as one line: "Error in config: model: routing row ..."


def test_gpu_trainers_compile_by_default(tmp_path):
    from zorro.run import compile_wanted

    def wanted(*overrides):
        return compile_wanted(compose_cfg(overrides=["debug=tiny", *overrides], output_dir=tmp_path))

    assert wanted("trainer=gpu") and wanted("trainer=ddp")
    assert not wanted("trainer=gpu", "compile=false") and not wanted("trainer=cpu") and not wanted("trainer=tpu")
    assert wanted("trainer=cpu", "compile=true")
    with pytest.raises(ConfigError, match="compile: expected true, false or auto"):
        wanted("compile=yes")
