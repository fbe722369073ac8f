"""zorro.checkpoint: a checkpoint of the old layout reads as the current one (upgrade_checkpoint), and a run is
rebuilt from a checkpoint's config plus explicit overrides (rebuild_config)."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from zorro.checkpoint import checkpoint_run, rebuild_config, upgrade_checkpoint

from .conftest import compose_cfg

DATASET = {"num_classes": 2, "multi_label": False, "class_names": ["a", "b"]}


def old_layout() -> dict:
    """A checkpoint as train.py wrote it before: the run config and dataset as top-level keys, lr_reference_batch in
    the optimizer's config, and two_streams' unused fusion copies of separate weights in the state dict."""
    config = {"seed": 0, "model": {"_target_": "m"}, "task": {"_target_": "zorro.tasks.SupervisedTask"},
              "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5, "lr_reference_batch": 64}}
    state = {"backbone.blocks.0.qkv.parts.audio.weight": torch.ones(1),
             "backbone.blocks.0.qkv.parts.fusion.weight": torch.ones(1)}
    return {"state_dict": state, "zorro_config": config, "zorro_dataset": DATASET, "epoch": 3}


def test_an_old_layout_checkpoint_reads_as_the_current_one():
    old = old_layout()
    before = copy.deepcopy(old)
    new = upgrade_checkpoint(old, model_keys=["backbone.blocks.0.qkv.parts.audio.weight"])
    assert set(new) == {"state_dict", "hyper_parameters", "epoch"} and new["epoch"] == 3
    config = new["hyper_parameters"]["config"]
    assert "lr_reference_batch" not in config["optimizer"] and config["task"]["lr_reference_batch"] == 64
    assert new["hyper_parameters"]["dataset"] == DATASET
    assert list(new["state_dict"]) == ["backbone.blocks.0.qkv.parts.audio.weight"]
    assert old.keys() == before.keys() and old["zorro_config"] == before["zorro_config"]  # the input unchanged
    assert len(old["state_dict"]) == 2
    assert upgrade_checkpoint(new) == new  # idempotent
    assert checkpoint_run(old)[0] == config and checkpoint_run(old)[1].class_names == ("a", "b")
    # without the model's keys the state dict is left as it is (the loading task filters it: load_state_dict)
    assert len(upgrade_checkpoint(old)["state_dict"]) == 2


def test_a_task_setting_given_in_the_new_place_wins_over_the_old_one():
    old = old_layout()
    old["zorro_config"]["task"]["lr_reference_batch"] = 32
    assert checkpoint_run(old)[0]["task"]["lr_reference_batch"] == 32


def test_the_rebuilt_config_is_the_checkpoints_with_the_explicit_overrides(tmp_path):
    """key=value (interpolations resolved in the rebuilt run), +key, ~key; a group that composes into other keys
    (masking=) is ignored and said so; the command's own keys come from its config; without overrides nothing
    else changes."""
    saved = OmegaConf.to_container(compose_cfg(overrides=["debug=tiny", "logger=none"]), resolve=False)
    saved = {**saved, "paths": {"output_dir": "/old/run"}, "pretrained": "/w.pth",
             "trainer": {**saved["trainer"], "default_root_dir": "/old/run"}}
    overrides = ["masking=two_streams", "trainer.max_epochs=7", "+task.extra=1", "~scheduler",
                 "data.num_val=${data.batch_size}", f"paths.output_dir={tmp_path}"]
    cfg = compose_cfg(overrides=["debug=tiny", "logger=csv", *overrides])
    rebuilt = rebuild_config(saved, overrides, cfg, own=("paths", "logger"))
    run = rebuilt.config
    assert rebuilt.applied == overrides[1:5] and rebuilt.ignored == ["masking=two_streams"]
    assert run.trainer.max_epochs == 7 and run.task.extra == 1 and "scheduler" not in run
    assert run.data.num_val == run.data.batch_size == saved["data"]["batch_size"]
    assert run.paths.output_dir == str(tmp_path) and run.trainer.default_root_dir == str(tmp_path)
    assert "csv" in run.logger and run.pretrained is None and run.model == saved["model"]
    untouched = rebuild_config(saved).config
    assert OmegaConf.to_container(untouched.model) == saved["model"] and untouched.trainer.max_epochs == \
        saved["trainer"]["max_epochs"]


def test_an_old_layout_checkpoint_file_evaluates_and_resumes(tmp_path):
    """A checkpoint file in the old layout: evaluate.py scores it (Lightning's restore loads its weights) and a
    resumed train.py rebuilds its run with the LR scaling as a task setting (the config checks pass: the optimizer
    has no unknown key)."""
    import lightning

    from zorro.checkpoint import dataset_dict
    from zorro.run import build_task, evaluate, resume_config

    cfg = compose_cfg(overrides=["debug=tiny", "logger=none", "data.num_test=4", "data.batch_size=4"],
                      output_dir=tmp_path / "run")
    datamodule, task = build_task(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["task"].pop("lr_reference_batch")
    config["optimizer"]["lr_reference_batch"] = 4
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": task.state_dict(), "pytorch-lightning_version": lightning.__version__,
                "zorro_config": config, "zorro_dataset": dataset_dict(datamodule.info)}, old)

    metrics = evaluate(compose_cfg("evaluate", overrides=[f"ckpt_path={old}"], output_dir=tmp_path / "eval"))
    assert metrics["test/num_clips"] == 4 and "test/audio_video/avg/top1" in metrics
    overrides = [f"ckpt_path={old}", "trainer.max_epochs=2"]
    run = resume_config(compose_cfg(overrides=overrides, output_dir=tmp_path / "resumed"), overrides)
    assert run.task.lr_reference_batch == 4 and "lr_reference_batch" not in run.optimizer
    assert run.trainer.max_epochs == 2 and run.ckpt_path == str(old)
    assert build_task(run)[1].lr_reference_batch == 4


def test_data_naming_the_checkpoints_own_loader_keeps_its_config_and_a_trainer_group_replaces():
    """`data=shards` on a checkpoint trained on shards keeps its sampling (frame rate, views); only the key=value
    overrides change it. `trainer=gpu` is the machine, not what the model learned: the group's config replaces."""
    saved = OmegaConf.to_container(compose_cfg(overrides=["data=shards", "data.root=/old", "data.frame_rate=1.0",
                                                          "trainer.max_epochs=9"]), resolve=False)
    overrides = ["data=shards", "trainer=gpu", "data.root=/new"]
    composed = compose_cfg(overrides=overrides)
    rebuilt = rebuild_config(saved, overrides, composed)
    assert rebuilt.kept == ["data=shards"] and rebuilt.applied == ["trainer=gpu", "data.root=/new"]
    assert rebuilt.config.data.frame_rate == 1.0 and rebuilt.config.data.root == "/new"
    assert rebuilt.config.trainer.accelerator == composed.trainer.accelerator != saved["trainer"]["accelerator"]


def test_resuming_an_old_layout_checkpoint_keeps_each_parameters_optimizer_state(tmp_path):
    """The input modules' tensors were renamed and moved in the parameter order: Lightning's restore (through
    on_load_checkpoint) gives every parameter its own Adam moments back, not those of the tensor at its old index."""
    from zorro.run import build_task

    from .models.test_embedding import old_layout

    cfg = compose_cfg(overrides=["debug=tiny", "logger=none"], output_dir=tmp_path / "run")
    task = build_task(cfg)[1]
    groups = task.param_group_names()
    named = dict(task.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in g]} for g in groups])
    for p in task.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    moments = {n: optimizer.state[named[n]]["exp_avg"] for g in groups for n in g}

    # the earlier layout: old names, and the input modules' tensors in other places of the parameter order
    old_names = {f"backbone.{o}": f"backbone.{n}" for o, n in
                 zip(old_layout("zorro_vit_tiny", dict.fromkeys(task.backbone.state_dict())),
                     task.backbone.state_dict())}
    assert set(old_names) != set(old_names.values())
    new_to_old = {n: o for o, n in old_names.items()}
    state = {new_to_old.get(k, k): v for k, v in task.state_dict().items()}
    order = sorted(state, key=lambda k: k in old_names and old_names[k] != k)  # renamed tensors last
    state = {k: state[k] for k in order}
    saved_groups = [sorted(g, key=lambda n: order.index(new_to_old.get(n, n))) for g in groups]
    assert saved_groups != groups
    flat = [n for g in saved_groups for n in g]
    saved = optimizer.state_dict()
    saved["state"] = {i: optimizer.state_dict()["state"][[m for g in groups for m in g].index(n)]
                      for i, n in enumerate(flat)}
    index = iter(range(len(flat)))
    saved["param_groups"] = [{**pg, "params": [next(index) for _ in g]} for pg, g in zip(saved["param_groups"],
                                                                                        saved_groups)]
    checkpoint = {"state_dict": state, "optimizer_states": [saved]}

    resumed = build_task(cfg)[1]
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    restored = checkpoint["optimizer_states"][0]
    for i, name in enumerate(n for g in resumed.param_group_names() for n in g):
        assert torch.equal(restored["state"][i]["exp_avg"], moments[name]), name
