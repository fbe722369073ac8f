"""Every option of every config group composes, and each group's objects instantiate."""

import pytest
from hydra.utils import get_class, instantiate

from zorro.config import ConfigError, check_config
from zorro.run import build

from .conftest import CONF, compose_cfg

NEEDS_DATA_ROOT = {"shards", "mixed"}  # composed here; instantiated in tests/data with real shards


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = ["model", "masking", "task", "data", "trainer", "optimizer", "scheduler", "logger", "callbacks",
          "debug", "experiment"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    cfg = compose_cfg(overrides=[f"{group}={option}"], output_dir=tmp_path)
    assert cfg.model._target_ and cfg.trainer._target_


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("masking", options("masking"))
def test_models_instantiate_with_every_masking(model, masking, tmp_path):
    if not model.endswith("_tiny"):
        pytest.skip("base sizes are covered by tests/models (parameter counts)")
    cfg = compose_cfg(overrides=[f"model={model}", f"masking={masking}"], output_dir=tmp_path)
    cls = get_class(cfg.model._target_)
    if not hasattr(cls, "maskings"):  # baselines (MBT, CAV-MAE) have their own fixed fusion
        with pytest.raises(ConfigError, match="model.masking"):
            check_config(cfg)
        return
    if masking not in cls.maskings:
        with pytest.raises(ConfigError, match=f"model.masking: {cls.__name__} implements"):
            check_config(cfg)
        return
    backbone = instantiate(cfg.model)
    assert backbone.routing.name == masking


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "optimizer", "scheduler", "task"])
def test_group_options_instantiate(group, tmp_path):
    for option in options(group):
        if option in ("tpu", "slurm"):
            continue  # needs torch_xla: tests/test_xla.py; a SLURM job: tests/test_preemption.py
        extra = ["trainer.accelerator=cpu"] if (group, option) in {("trainer", "gpu"), ("trainer", "ddp")} else []
        cfg = compose_cfg(overrides=["debug=tiny", f"{group}={option}", *extra], output_dir=tmp_path)
        datamodule, task, trainer = build(cfg)
        assert task.backbone is not None and trainer is not None


def test_data_options_instantiate(tmp_path):
    for option in options("data"):
        if option in NEEDS_DATA_ROOT:
            continue
        cfg = compose_cfg(overrides=["debug=tiny", f"data={option}"], output_dir=tmp_path)
        assert instantiate(cfg.data).info.num_classes > 0


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
    train(cfg)
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
