"""MBT's classifier (one linear layer on both CLS tokens, logits averaged), its AST SpecAugment, the paper's LR
scaling with the global batch, and the logged audio-length mismatch."""

import functools
import logging

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from zorro.data.info import DatasetInfo
from zorro.data.synthetic import SyntheticDataModule
from zorro.models import MBT, mbt_tiny, zorro_vit_tiny
from zorro.tasks import SupervisedTask

from ..conftest import compose_cfg
from ..models.helpers import inputs


def mbt_task(multi_label=True, **kw):
    torch.manual_seed(0)
    return SupervisedTask(backbone=mbt_tiny(), dataset=DatasetInfo(num_classes=5, multi_label=multi_label),
                          optimizer=functools.partial(torch.optim.SGD, lr=0.5), **kw)


@pytest.mark.parametrize("multi_label", [True, False])
def test_mbt_shares_one_classifier_and_averages_logits(multi_label):
    task = mbt_task(multi_label, shared_head=True, combine="logits").eval()
    assert task.heads["audio"] is task.heads["video"]
    assert sum(p.numel() for p in task.heads.parameters()) == (64 + 1) * 5  # one linear layer
    audio, video = inputs()
    batch = {"audio": audio, "video": video}
    with torch.no_grad():
        outputs = task(batch)
        probs = task.predict_probs(batch, outputs=outputs)
        logits = (task.heads["audio"](outputs["audio"]) + task.heads["video"](outputs["video"])) / 2
    torch.testing.assert_close(probs["avg"], task.probabilities(logits))
    assert not torch.allclose(probs["avg"], (probs["audio"] + probs["video"]) / 2)  # not Zorro's average
    target = task.soft_targets(torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]) if multi_label else torch.tensor([1, 3]))
    losses = task.losses(outputs, target, batch)
    assert set(losses) == {"audio", "video"}  # scenic trains each CLS token's logits; compute_loss averages them
    for name in ("audio", "video"):
        torch.testing.assert_close(losses[name], task.head_loss(task.heads[name](outputs[name]), target).mean())


def test_mbt_recipe_loss_is_scenics_sigmoid_ce_summed_over_classes_and_averaged_over_cls_tokens(tmp_path):
    """scenic's MBTMultilabelClassificationModel.loss_function: for each CLS token's logits, sigmoid cross-entropy
    summed over the classes and averaged over the batch (weighted_sigmoid_cross_entropy); the tokens' losses averaged.
    The modality-mixup targets are per token, each mixed with its modality's lambda (scenic's mixup_modalities)."""
    cfg = compose_cfg(overrides=["experiment=mbt_as500k", "data.root=/d", "pretrained=/w", "model=mbt_tiny"],
                      output_dir=tmp_path)
    torch.manual_seed(0)
    task = instantiate(cfg.task, backbone=instantiate(cfg.model), dataset=DatasetInfo(num_classes=5, multi_label=True),
                       optimizer=instantiate(cfg.optimizer))
    assert task.loss_reduction == "sum_classes" and task.view_average == "logits"
    audio, video = inputs(batch=4)
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 1]])
    batch = {"audio": audio, "video": video, "label": labels}
    torch.manual_seed(5)
    loss, _ = task.compute_loss(batch)
    torch.manual_seed(5)  # replay: the same mixup draws, the same stochastic depth
    beta = torch.distributions.Beta(0.3, 0.3)
    lam = {"audio": float(beta.sample()), "video": float(beta.sample())}
    perm = torch.randperm(4)
    mixed = {"audio": lam["audio"] * audio.float() / 32768 + (1 - lam["audio"]) * audio.float()[perm] / 32768,
             "video": lam["video"] * video.float() + (1 - lam["video"]) * video.float()[perm]}
    outputs = task.backbone(**mixed)
    per_token = []
    for name in ("audio", "video"):
        target = lam[name] * labels + (1 - lam[name]) * labels[perm]
        x = task.heads[name](outputs[name])
        ce = -(target * torch.nn.functional.logsigmoid(x) + (1 - target) * torch.nn.functional.logsigmoid(-x))
        per_token.append(ce.sum() / 4)  # sum over classes and batch, / batch size
    torch.testing.assert_close(loss, torch.stack(per_token).mean())


def test_mbt_recipe_clips_the_gradients_global_norm_at_one(tmp_path):
    cfg = compose_cfg(overrides=["experiment=mbt_as500k", "data.root=/d", "pretrained=/w"], output_dir=tmp_path)
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.gradient_clip_algorithm == "norm"
    assert tuple(cfg.model.video_mean) == tuple(cfg.model.video_std) == (0.5, 0.5, 0.5)  # the in21k ViT's [-1, 1]
    zorro = compose_cfg(overrides=["experiment=as2m_zorro_vit", "data.root=/d"], output_dir=tmp_path)
    assert zorro.trainer.gradient_clip_val is None and zorro.task.loss_reduction == "mean"


def test_zorro_keeps_one_head_per_output_with_averaged_probabilities():
    task = SupervisedTask(backbone=zorro_vit_tiny(), dataset=DatasetInfo(num_classes=5, multi_label=False),
                          optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    assert task.combine == "probs" and len({id(h) for h in task.heads.values()}) == len(task.heads) == 4
    with pytest.raises(ValueError, match="combine must be one of"):
        mbt_task(combine="mean")


def test_mbt_spec_augment_is_asts_one_48_bin_and_one_192_frame_mask():
    torch.manual_seed(0)
    model = MBT(dim=32, depth=1, num_heads=2, fusion_layer=0, num_frames=1, image_size=32)  # 128 mels, 8 s
    frontend = model.audio_embed.frontend
    assert (frontend.freq_mask, frontend.time_mask, frontend.num_masks, frontend.freq_jitter) == (48, 192, 1, 0)
    x = frontend.augment(torch.ones(64, 1, 128, 800))
    bins = (x == 0).all(dim=3)[:, 0]  # B x 128: frequency bins zeroed over all frames
    frames = (x == 0).all(dim=2)[:, 0]  # B x 800
    for zeroed, widest in ((bins, 48), (frames, 192)):
        widths = zeroed.sum(-1)
        assert widths.max() < widest and widths.max() > widest // 2  # one band up to AST's width, not two halves
        for row, w in zip(zeroed, widths):  # one contiguous band per example
            idx = row.nonzero().flatten()
            assert w == 0 or idx[-1] - idx[0] + 1 == w


def test_the_mbt_model_config_carries_asts_masks(tmp_path):
    cfg = compose_cfg(overrides=["model=mbt"], output_dir=tmp_path)
    assert (cfg.model.freq_mask, cfg.model.time_mask, cfg.model.num_masks, cfg.model.freq_jitter) == (48, 192, 1, 0)


def test_lr_is_scaled_with_the_global_batch_of_a_two_device_run():
    """lr = base_lr x (per-device batch x devices x nodes x accumulation) / reference: 0.5 x 16 x 2 x 4 / 64 = 1.0."""
    task = SupervisedTask(backbone=mbt_tiny(), dataset=DatasetInfo(num_classes=5, multi_label=True),
                          optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9), lr_reference_batch=64)
    assert task.lr_reference_batch == 64 and task.hparams["lr_reference_batch"] == 64
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", accumulate_grad_batches=4, logger=False,
                         enable_checkpointing=False)
    data = SyntheticDataModule(batch_size=16, num_frames=4, image_size=64, sample_rate=16000, clip_seconds=1.28)
    trainer._data_connector.attach_datamodule(task, datamodule=data)
    task.trainer = trainer
    optimizer = task.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.0] * len(optimizer.param_groups))
    task.lr_reference_batch = None  # off: the configured lr
    assert {g["lr"] for g in task.configure_optimizers().param_groups} == {0.5}


def test_the_mbt_recipe_builds_a_task_that_scales_its_lr(tmp_path):
    cfg = compose_cfg(overrides=["experiment=mbt_as500k", "data.root=/d", "pretrained=/w", "model=mbt_tiny",
                                 "trainer.accelerator=cpu", "trainer.devices=2"], output_dir=tmp_path)
    task = instantiate(cfg.task, backbone=instantiate(cfg.model), dataset=DatasetInfo(num_classes=5, multi_label=True),
                       optimizer=instantiate(cfg.optimizer))
    assert task.lr_reference_batch == 64 and task.optimizer_factory.keywords["lr"] == 0.5
    assert task.shared_head and task.combine == "logits"


def test_an_audio_length_other_than_the_models_is_logged_once(caplog):
    model = mbt_tiny().eval()
    audio, video = inputs()  # 1.28 s: the configured length, nothing logged
    with caplog.at_level(logging.WARNING, logger="zorro.models.frontends"):
        model(audio, video)
        assert not caplog.records
        longer = torch.cat([audio, audio], dim=1)  # 2.56 s
        model(longer, video)
        model(longer, video)
    assert len(caplog.records) == 1 and "configured for 1.28 s" in caplog.records[0].getMessage()
