import functools

import pytest
import torch
import torch.nn.functional as F

from zorro.models import zorro_vit_tiny
from zorro.tasks import ContrastiveTask, nce_loss
from zorro.tasks.retrieval import retrieval_recall

from ..models.helpers import inputs


def test_joint_nce_is_eq2():
    torch.manual_seed(0)
    za, zv = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    tau = 0.1
    sim = torch.exp(za @ zv.t() / tau)
    expected = -torch.log(sim.diagonal() / sim.sum()).mean()
    torch.testing.assert_close(nce_loss(za, zv, temperature=tau, normalizer="joint"), expected)


def test_symmetric_nce_prefers_aligned_pairs():
    z = F.normalize(torch.randn(6, 8), dim=-1)
    aligned = nce_loss(z, z, temperature=0.1, normalizer="symmetric")
    shuffled = nce_loss(z, z.roll(1, 0), temperature=0.1, normalizer="symmetric")
    assert aligned < shuffled


def test_retrieval_recall():
    z = torch.eye(4)
    assert retrieval_recall(z, z)["R@1"] == 1.0
    assert retrieval_recall(z, z.roll(1, 0))["R@1"] == 0.0


def make_task(masking="zorro", loss="eq3"):
    return ContrastiveTask(backbone=zorro_vit_tiny(masking=masking), loss=loss, projector_hidden_dim=32,
                           projector_dim=16, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))


def test_eq3_needs_fusion_output():
    with pytest.raises(ValueError, match="use loss=eq2"):
        make_task(masking="two_streams", loss="eq3")
    assert set(make_task(masking="two_streams", loss="eq2").projectors) == {"audio", "video"}


def test_training_step_uses_only_samples_with_both_modalities():
    task = make_task()
    audio, video = inputs(batch=4)
    batch = {"audio": audio, "video": video, "has_audio": torch.tensor([True, True, True, False]),
             "has_video": torch.tensor([True, True, True, True])}
    z, valid = task.embed(batch)
    assert valid.tolist() == [True, True, True, False]
    losses = task.contrastive_loss(z, valid)
    assert set(losses) == {"audio_video", "audio_fusion", "video_fusion"}
    sum(losses.values()).backward()
    assert task.projectors["fusion"].net[0].weight.grad is not None


@pytest.mark.parametrize("masking,expected", [("zorro", "eq3"), ("two_streams", "eq2"), ("input_level", "eq2"),
                                              ("bottleneck", "eq2")])
def test_auto_loss_is_what_the_paper_ran_for_each_masking(masking, expected):
    """Table 3's self-supervised half: Zorro with eq. 3, the ablations with eq. 2 (audio and video outputs), so
    `-m masking=zorro,two_streams,input_level,bottleneck task=contrastive` is one sweep."""
    task = make_task(masking=masking, loss="auto")
    assert task.loss_name == expected
    assert set(task.projectors) == ({"audio", "video", "fusion"} if expected == "eq3" else {"audio", "video"})


def test_projector_batchnorm_statistics_come_from_valid_samples_only():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    valid = torch.tensor([True, True, True, True, False, False])
    zero_filled = x.clone()
    zero_filled[~valid] = 1e3  # whatever a zero-filled sample's output is, it must not move the statistics
    from zorro.tasks.contrastive import Projector

    proj = Projector(in_dim=8, hidden_dim=16, out_dim=4).train()
    reference = Projector(in_dim=8, hidden_dim=16, out_dim=4).train()
    reference.load_state_dict(proj.state_dict())
    out = proj(zero_filled, valid)
    expected = reference(x[valid])
    torch.testing.assert_close(out[valid], expected)
    torch.testing.assert_close(proj.net[1].running_mean, reference.net[1].running_mean)
    assert torch.isfinite(out).all()
    for norm in ("layernorm", "none"):  # the choice is a config value; every option trains
        p = Projector(in_dim=8, hidden_dim=16, out_dim=4, norm=norm)
        assert p(x, valid).shape == (6, 4) and not any(isinstance(m, torch.nn.BatchNorm1d) for m in p.modules())
    with pytest.raises(ValueError, match="projector_norm"):
        Projector(in_dim=8, hidden_dim=16, out_dim=4, norm="groupnorm")


def test_retrieval_evaluation_scores_the_clip_embeddings_of_clips_with_both_modalities():
    torch.manual_seed(0)
    task = make_task().eval()
    audio, video = inputs(batch=4)
    batch = {"audio": audio, "video": video, "key": ["a", "b", "c", "d"],
             "has_audio": torch.tensor([True, True, True, False]), "has_video": torch.ones(4, dtype=torch.bool)}
    with torch.no_grad():
        z, valid = task.embed(batch)
        task.validation_step(batch, 0)
        task.validation_step(batch, 1)  # a second view of the same clips: averaged per key
    task.on_validation_epoch_end()
    result = task.eval_result
    za, zv = result.embeddings
    order = lambda x: x[x[:, 0].argsort()]  # clips come back ordered by key id
    torch.testing.assert_close(order(za), order(F.normalize(z["audio"][valid], dim=-1)))
    a2v, v2a = retrieval_recall(za, zv), retrieval_recall(zv, za)
    assert result.stage == "val" and za.shape[0] == 3 and za.device.type == "cpu"
    assert result.scores["val/a2v_R@1"] == float(a2v["R@1"]) and result.scores["val/v2a_R@1"] == float(v2a["R@1"])
    assert result.scores["val/score"] == pytest.approx((float(a2v["R@1"]) + float(v2a["R@1"])) / 2)
    assert result.scores["val/nce_audio_video"] == pytest.approx(float(nce_loss(za, zv, temperature=0.05)))
    terms = [result.scores[f"val/nce_{p}"] for p in ("audio_video", "audio_fusion", "video_fusion")]
    assert result.scores["val/loss"] == pytest.approx(sum(terms))


@pytest.mark.parametrize("missing_modality", ["zeros", "drop"])
def test_a_batch_without_pairs_is_a_zero_loss_not_an_error(missing_modality):
    """An audio-only batch (mixed data, or a shard batch of audio-only clips) reaches the task with video None
    (the batch contract); with one pair or none there are no negatives: the loss is zero, finite, backpropagates,
    and the projector's BatchNorm statistics do not move."""
    task = ContrastiveTask(backbone=zorro_vit_tiny(missing_modality=missing_modality), loss="eq3",
                           projector_hidden_dim=32, projector_dim=16,
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)).train()
    audio, video = inputs(batch=3)
    bn = task.projectors["audio"].net[1]
    before = bn.running_mean.clone()
    for batch in ({"audio": audio, "video": None},
                  {"audio": audio, "video": video, "has_video": torch.tensor([True, False, False])}):
        loss, parts = task.compute_loss(task.device_batch(batch))
        assert torch.isfinite(loss) and loss.item() == 0.0 and task.num_pairs < 2
        loss.backward()
        torch.testing.assert_close(bn.running_mean, before)
    batch = {"audio": audio, "video": video}  # three pairs: a real loss
    loss, _ = task.compute_loss(task.device_batch(batch))
    assert loss.item() > 0 and task.num_pairs == 3
