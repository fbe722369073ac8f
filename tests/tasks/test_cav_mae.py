import functools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from zorro.callbacks import save_reconstruction
from zorro.config import ConfigError
from zorro.data.shards import ShardDataModule
from zorro.data.synthetic import SyntheticDataModule
from zorro.models import cav_mae_tiny, zorro_vit_tiny
from zorro.run import build_task, train
from zorro.tasks import CAVMAEPretrainTask
from zorro.tasks.cav_mae import cav_nce, masked_mse

from ..conftest import compose_cfg
from ..models.helpers import inputs


def make_task(**kw):
    return CAVMAEPretrainTask(backbone=cav_mae_tiny(audio_noise=False),
                              optimizer=functools.partial(torch.optim.Adam, lr=1e-3), **kw)


def test_needs_a_masked_autoencoder_backbone():
    task = CAVMAEPretrainTask(backbone=zorro_vit_tiny(), optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(ConfigError, match="needs a CAV-MAE backbone"):
        task.setup("fit")


def test_nce_is_eq7():
    torch.manual_seed(0)
    za, zv = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    s = zv @ za.t()  # s_ik = c_v_i . c_a_k
    expected = -torch.log(torch.exp(s.diagonal() / 0.05) / torch.exp(s / 0.05).sum(1)).mean()
    loss, accuracy = cav_nce(za, zv, temperature=0.05)
    torch.testing.assert_close(loss, expected)
    assert cav_nce(za, za, temperature=0.05)[1] == 1.0
    assert cav_nce(za, zv, temperature=0.05, normalizer="symmetric")[0] > 0


def test_masked_mse_counts_only_masked_patches_of_present_samples():
    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    target[:, :2] = 5.0  # errors on visible patches must not count
    mask = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]])
    assert masked_mse(pred, target, mask, torch.tensor([True, True])) == 1.0
    target[1] = 9.0
    assert masked_mse(pred, target, mask, torch.tensor([True, False])) == 1.0


def test_loss_terms_and_samples_without_a_pair():
    torch.manual_seed(0)
    task = make_task()
    audio, video = inputs(batch=4)
    batch = {"audio": audio, "video": video[:, :1], "has_audio": torch.tensor([True, True, True, False]),
             "has_video": torch.ones(4, dtype=torch.bool)}
    loss, parts = task.compute_loss(batch)
    assert set(parts) == {"rec_audio", "rec_video", "rec", "nce", "c_acc"} and task.num_pairs == 3
    torch.testing.assert_close(loss, parts["rec"] + 0.01 * parts["nce"])
    loss.backward()
    backbone = task.backbone
    for p in (backbone.decoder_pred_a.weight, backbone.decoder_pred_v.weight, backbone.blocks_u[0].norm1_a.weight,
              backbone.blocks_u[0].norm1_v.weight, backbone.norm_a.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_overfitting_one_batch_lowers_the_loss():
    torch.manual_seed(0)
    task = make_task()
    audio, video = inputs(batch=4)
    batch = {"audio": audio, "video": video[:, :1]}
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):  # a fresh random mask every step, as in training
        loss, parts = task.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((parts["rec"].item(), parts["nce"].item()))
    first, last = torch.tensor(losses[:5]).mean(0), torch.tensor(losses[-5:]).mean(0)
    print(f"reconstruction {first[0]:.3f} -> {last[0]:.3f}, NCE {first[1]:.3f} -> {last[1]:.3f}")
    assert last[0] < 0.8 * first[0] and last[1] < 0.8 * first[1]  # measured: 2.09 -> 1.49, 1.58 -> 1.05


def test_reconstruction_picture(tmp_path):
    audio, video = inputs()
    path = save_reconstruction(cav_mae_tiny(), {"audio": audio, "video": video, "key": ["a", "b"]},
                               tmp_path / "r.png", num_samples=2)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_synthetic_evaluation_views_share_audio_and_key():
    data = SyntheticDataModule(num_train=4, num_val=3, num_test=0, num_frames=1, image_size=64, sample_rate=16000,
                               clip_seconds=1.28, eval_views=4)
    items = [data.splits["val"][i] for i in range(len(data.splits["val"]))]
    assert Counter(item["key"] for item in items) == {k: 4 for k in {item["key"] for item in items}}
    first = [item for item in items if item["key"] == items[0]["key"]]
    assert all(torch.equal(item["audio"], first[0]["audio"]) for item in first)
    assert not torch.equal(first[0]["video"], first[-1]["video"])  # later frames of the moving square
    assert len(data.splits["train"]) == 4 and data.splits["train"][0]["video"].shape == (1, 3, 64, 64)


def test_shard_views_are_single_frames_with_the_clip_audio(demo_shards):
    """CAV-MAE's sampling on data_prep shards: one frame per view (1 FPS), every view with the clip's audio."""
    module = ShardDataModule(root=str(demo_shards), batch_size=4, num_workers=0, num_frames=1, frame_rate=1.0,
                             image_size=32, sample_rate=16000, eval_windows=2, eval_crops=1, audio_seconds=1.28,
                             audio_align="clip_start", min_crop_scale=1.0, aspect_ratio=(1.0, 1.0), flip=False,
                             color_prob=0.0)
    train_batch = next(iter(module.train_dataloader()))
    assert train_batch["video"].shape == (4, 1, 3, 32, 32) and train_batch["audio"].shape == (4, 20480)
    views = {}
    for batch in module.test_dataloader():
        for i, key in enumerate(batch["key"]):
            views.setdefault(key, []).append((batch["audio"][i], batch["video"][i]))
    assert views and all(len(v) == 2 for v in views.values())  # the demo clips are longer than 1 s
    for clip in views.values():
        assert torch.equal(clip[0][0], clip[1][0])  # the same audio with each frame


def test_pretrain_then_finetune_from_the_checkpoint(tmp_path):
    """train.py model=cav_mae_tiny task=cav_mae_pretrain ..., then task=supervised init_from=<its checkpoint>."""
    small = ["debug=tiny", "logger=none", "trainer.max_epochs=1", "data.num_train=32", "data.num_val=8",
             "data.num_test=8", "data.batch_size=8", "data.eval_views=2"]
    pre = compose_cfg(overrides=["model=cav_mae_tiny", "task=cav_mae_pretrain", "callbacks=cav_mae",
                                 "callbacks.reconstructions.every_n_steps=2", *small], output_dir=tmp_path / "pre")
    metrics = train(pre)
    assert {"val/score", "test/a2v_R@1", "test/rec_audio", "test/rec_video", "train/nce"} <= set(metrics)
    assert sorted(p.name for p in (tmp_path / "pre" / "reconstructions").glob("*.png")) == ["step0000002.png",
                                                                                          "step0000004.png"]
    ckpt = next((tmp_path / "pre" / "checkpoints").glob("best-*.ckpt"))

    fine = compose_cfg(overrides=["model=cav_mae_tiny", "model.decoder_depth=0", "task=supervised",
                                  f"init_from={ckpt}", *small], output_dir=tmp_path / "fine")
    _, task = build_task(fine)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    backbone = task.backbone.state_dict()
    assert backbone and not any(k.startswith(("decoder", "mask_token")) for k in backbone)
    for key, value in backbone.items():
        assert torch.equal(value, saved[f"backbone.{key}"]), key
    metrics = train(fine)
    assert "test/audio_video/avg/top1" in metrics


def test_contrastive_batch_contrasts_within_groups_of_clips():
    """contrastive_batch=N: the official per-GPU NCE (DataParallel's chunks), each group's clips its only negatives,
    the groups' losses averaged; samples without a pair leave their group."""
    torch.manual_seed(0)
    z = {m: F.normalize(torch.randn(6, 8), dim=-1) for m in ("audio", "video")}
    valid = torch.tensor([True, True, True, True, False, True])
    loss, accuracy = make_task(contrastive_batch=3).grouped_nce(z, valid)
    first = cav_nce(z["audio"][:3], z["video"][:3], temperature=0.05)
    second = cav_nce(z["audio"][[3, 5]], z["video"][[3, 5]], temperature=0.05)
    torch.testing.assert_close(loss, (first[0] + second[0]) / 2)
    torch.testing.assert_close(accuracy, (first[1] + second[1]) / 2)
    everyone = make_task().contrastive_loss({"audio": z["audio"][:4], "video": z["video"][:4]}, {
        "audio": torch.zeros(4, 1), "video": torch.zeros(4, 1)})[0]
    torch.testing.assert_close(everyone, cav_nce(z["audio"][:4], z["video"][:4], temperature=0.05)[0])
    with pytest.raises(ValueError, match="contrastive_batch"):
        make_task(contrastive_batch=1)


def test_the_recipes_batch_and_negatives_are_the_papers():
    """cav_mae_pretrain: batch 48 with NCE groups of 12 (48 on 4 GPUs) and the LR read at batch 48;
    cav_mae_finetune: the official head, learned positions, smoothing and 10x head LR."""
    pre = compose_cfg(overrides=["experiment=cav_mae_pretrain", "data.root=x", "pretrained=x"])
    assert (pre.data.batch_size, pre.task.contrastive_batch, pre.task.lr_reference_batch) == (48, 12, 48)
    fine = compose_cfg(overrides=["experiment=cav_mae_finetune", "data.root=x", "init_from=x"])
    assert (fine.model.head, fine.model.trainable_pos, fine.task.smoothing, fine.task.head_lr_scale) == (
        "official", True, "cav_mae", 10)
    assert (fine.data.batch_size, fine.task.lr_reference_batch) == (48, 48)
