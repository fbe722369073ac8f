"""What every task shares: the batch contract in the batch hooks, weight-decay groups, saved hyper-parameters."""

import functools
import math

import pytest
import torch

from zorro.data.info import DatasetInfo
from zorro.data.shards import ShardDataModule
from zorro.models import MODELS, zorro_vit_tiny
from zorro.tasks import CAVMAEPretrainTask, ContrastiveTask, SupervisedTask
from zorro.checkpoint import checkpoint_run
from zorro.data.batch import float_audio, mark_absent

from ..models.helpers import inputs

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)


def supervised(backbone, **kw):
    return SupervisedTask(backbone=backbone, dataset=DatasetInfo(num_classes=6, multi_label=False), optimizer=ADAMW,
                          **kw)


def tokens_seen(backbone) -> list[int]:
    """The sequence length entering the first block, per forward call."""
    lengths = []
    backbone.blocks[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    return lengths


# -- the batch contract ------------------------------------------------------------------------------------------
def test_flags_filled_audio_as_float_and_never_both_dropped():
    audio, video = inputs(batch=3)
    batch = float_audio(mark_absent({"audio": audio, "video": video, "key": ["a", "b", "c"]}))
    assert batch["has_audio"].all() and batch["has_video"].all()  # no flags from the loader: all present
    assert batch["audio"].dtype == torch.float32 and torch.equal(batch["audio"], audio.float() / 32768)
    assert not mark_absent({"audio": audio})["has_video"].any()  # a modality not sent is absent
    mixed = mark_absent({"audio": audio, "video": video, "has_video": torch.tensor([True, False, True])})
    assert mixed["video"] is video and mixed["has_video"].tolist() == [True, False, True]  # per-sample: zero-filled
    none = torch.zeros(3, dtype=torch.bool)
    both = mark_absent({"audio": audio, "video": video, "has_audio": none, "has_video": none})
    assert both["audio"] is audio and both["video"] is video  # a backbone needs one of them


@pytest.mark.parametrize("absent", ["video", "audio"])
def test_with_zeros_the_loaders_zero_filled_tensor_and_none_give_the_same_outputs(absent):
    """missing_modality=zeros: the hooks turn a modality absent from the whole batch into None, and the backbone's
    zero input for None is exactly the zero-filled sample's."""
    torch.manual_seed(0)
    task = supervised(zorro_vit_tiny(missing_modality="zeros")).eval()
    audio, video = inputs(batch=2)
    loader_batch = {"audio": audio, "video": video, "label": torch.tensor([0, 1]), "key": ["a", "b"],
                    "has_audio": torch.ones(2, dtype=torch.bool), "has_video": torch.ones(2, dtype=torch.bool)}
    loader_batch[absent] = torch.zeros_like(loader_batch[absent])
    loader_batch[f"has_{absent}"] = torch.zeros(2, dtype=torch.bool)
    batch = task.device_batch(loader_batch)
    assert batch[absent] is None
    lengths = tokens_seen(task.backbone)
    with torch.no_grad():
        got = task(batch)
        zero_filled = task.backbone(audio=loader_batch["audio"], video=loader_batch["video"],
                                    has_audio=loader_batch["has_audio"], has_video=loader_batch["has_video"])
    assert lengths[0] == lengths[1]  # every stream runs
    assert set(got) == set(zero_filled) == {"audio", "video", "fusion", "global"}
    for name in got:
        assert torch.equal(got[name], zero_filled[name]), name


def test_with_drop_the_absent_modality_is_left_out_of_the_sequence():
    torch.manual_seed(0)
    task = supervised(zorro_vit_tiny(missing_modality="drop")).eval()
    audio, video = inputs(batch=2)
    batch = task.device_batch({"audio": audio, "video": torch.zeros_like(video), "label": torch.tensor([0, 1]),
                               "has_video": torch.zeros(2, dtype=torch.bool)})
    lengths = tokens_seen(task.backbone)
    with torch.no_grad():
        dropped = task(batch)
        audio_only = task.backbone(audio=audio, drop_absent=True)
        full = task.backbone(audio=audio, video=video)
    backbone = task.backbone
    num_audio = backbone.audio_embed.grid[0] * backbone.audio_embed.grid[1]
    assert lengths[0] == lengths[1] == num_audio + backbone.num_fusion < lengths[2]
    assert set(dropped) == {"audio", "fusion", "global"}  # the video output reads no tokens
    for name in dropped:
        assert torch.equal(dropped[name], audio_only[name]), name
    torch.testing.assert_close(dropped["audio"], full["audio"], atol=1e-5, rtol=1e-4)  # isolated under zorro


@pytest.mark.parametrize("on_device", [False, True])
def test_an_audio_only_shard_batch_reaches_the_drop_path(demo_shards, on_device):
    """The shard loader sends zero-filled (or no encoded) frames with has_video false; the mixed loader's batches
    come whole from one such loader. After the hooks the video is None and `drop` leaves it out."""
    module = ShardDataModule(root=str(demo_shards), batch_size=2, num_workers=0, num_frames=4, image_size=64,
                             sample_rate=16000, audio_seconds=1.28, modalities=["audio"], decode_on_device=on_device)
    loader_batch = next(iter(module.train_dataloader()))
    assert ("frames" in loader_batch) == on_device and not loader_batch["has_video"].any()
    task = supervised(zorro_vit_tiny(missing_modality="drop")).eval()
    batch = task.device_batch(loader_batch)
    assert batch["video"] is None and "frames" not in batch and batch["audio"].dtype == torch.float32
    lengths = tokens_seen(task.backbone)
    with torch.no_grad():
        loss, _ = task.compute_loss(batch)
    assert torch.isfinite(loss) and lengths == [math.prod(task.backbone.audio_embed.grid) + 6]


# -- weight decay --------------------------------------------------------------------------------------------------
def tasks_of(name: str):
    backbone = MODELS[name]()
    yield supervised(backbone)
    yield ContrastiveTask(backbone=backbone, loss="eq2", projector_hidden_dim=16, projector_dim=8, optimizer=ADAMW)
    if name.startswith("cav_mae"):
        yield CAVMAEPretrainTask(backbone=backbone, optimizer=ADAMW)


@pytest.mark.parametrize("name", [n for n in MODELS if n.endswith("_tiny")])
def test_weight_decay_groups_are_the_hand_written_rule(name):
    """timm's param_groups_weight_decay gives what the project's own rule gave: no decay on ndim <= 1, on `*_pos`
    and on the backbone's no_weight_decay() names; decay on every other trainable parameter."""
    for task in tasks_of(name):
        skip = {f"backbone.{n}" for n in task.backbone.no_weight_decay()}
        names = {id(p): n for n, p in task.named_parameters()}
        expected_no_decay = {n for n, p in task.named_parameters()
                             if p.ndim <= 1 or n in skip or n.endswith("_pos")}
        decay, no_decay = task.configure_optimizers().param_groups
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        assert {names[id(p)] for p in no_decay["params"]} == expected_no_decay
        assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected_no_decay
        assert len(decay["params"]) + len(no_decay["params"]) == len(names)
        assert skip <= expected_no_decay  # every no_weight_decay() name is a parameter
    (only,) = task.param_groups(0.0)  # no decay at all (adam / sgd configs): one group (the old rule made two)
    assert only["weight_decay"] == 0.0 and len(only["params"]) == len(names)


# -- hyper-parameters --------------------------------------------------------------------------------------------
def test_a_checkpoint_carries_the_run_config_and_dataset_as_hyperparameters(tmp_path, monkeypatch):
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from zorro.run import build_task, train

    from ..conftest import compose_cfg

    cfg = compose_cfg(overrides=["debug=tiny", "logger=csv", "trainer.max_epochs=1", "data.num_train=8",
                                 "data.num_val=4", "data.num_test=4", "data.batch_size=4", "linear_probe=false"],
                      output_dir=tmp_path)
    _, task = build_task(cfg)
    assert task.hparams["dataset"] == {"num_classes": task.dataset.num_classes, "multi_label": False,
                                       "class_names": list(task.dataset.class_names)}
    assert task.hparams["config"]["model"]["_target_"] == cfg.model._target_ and task.hparams["mixup_alpha"] == 0.3
    assert not {"backbone", "optimizer", "scheduler"} & set(task.hparams)
    calls, log_hyperparams = [], CSVLogger.log_hyperparams
    monkeypatch.setattr(CSVLogger, "log_hyperparams", lambda self, params: calls.append(params) or
                        log_hyperparams(self, params))
    train(cfg)
    # Lightning logs the task's hyper-parameters at the start of fit and of test: the same dict, nothing else
    assert len(calls) == 2 and calls[0] == calls[1] and calls[0]["config"] == task.hparams["config"]
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert not {"zorro_config", "zorro_dataset"} & set(ckpt)
    config, info = checkpoint_run(ckpt)
    assert config == task.hparams["config"] and info == task.dataset
    (hparams_file,) = tmp_path.glob("csv/version_*/hparams.yaml")
    logged = yaml.safe_load(hparams_file.read_text())  # plain YAML: readable without this code
    assert logged["config"]["model"] == config["model"] and logged["dataset"]["num_classes"] == info.num_classes


def test_a_checkpoint_with_the_unused_two_streams_fusion_copies_still_loads_strictly():
    """A two_streams checkpoint that carries a fusion copy of every per-group layer (an older layout: separate
    weights built for every group, the fusion copies used by no step) still loads, with its weights."""
    task = supervised(zorro_vit_tiny(masking="two_streams", separate_weights=True))
    assert not any(".parts.fusion." in k for k in task.state_dict())
    old = {k: v.clone() + 1 for k, v in task.state_dict().items()}
    for key in [k for k in old if ".parts.audio." in k]:  # what the old model also had: a fusion copy
        old[key.replace(".parts.audio.", ".parts.fusion.")] = old[key].clone()
    task.load_state_dict(old)  # strict
    torch.testing.assert_close(task.state_dict()["backbone.blocks.0.attn.qkv.parts.audio.weight"],
                               old["backbone.blocks.0.attn.qkv.parts.audio.weight"])
    with pytest.raises(RuntimeError, match="Unexpected key"):  # anything else unexpected is still an error
        task.load_state_dict({**old, "backbone.blocks.0.extra.weight": torch.zeros(1)})
