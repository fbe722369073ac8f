import functools

import pytest
import torch

from zorro.data.info import DatasetInfo
from zorro.models import zorro_vit_tiny
from zorro.tasks import SupervisedTask, cosine_with_warmup, modality_flags

from ..models.helpers import inputs


def make_task(multi_label=False, **kw):
    return SupervisedTask(backbone=zorro_vit_tiny(), dataset=DatasetInfo(num_classes=6, multi_label=multi_label),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), **kw)


def test_one_head_per_output_and_averaged_prediction():
    task = make_task().eval()
    audio, video = inputs()
    probs = task.predict_probs({"audio": audio, "video": video})
    assert set(task.heads) == {"audio", "video", "fusion", "global"}
    heads = torch.stack([probs[n] for n in task.heads])
    torch.testing.assert_close(probs["avg"], heads.mean(0))
    torch.testing.assert_close(probs["avg"].sum(-1), torch.ones(2))


def test_targets_label_smoothing():
    task = make_task(label_smoothing=0.1)
    t = task.soft_targets(torch.tensor([2]))
    assert t[0, 2] == pytest.approx(0.9 + 0.1 / 6) and t.sum() == pytest.approx(1.0)
    ml = make_task(multi_label=True, label_smoothing=0.1).soft_targets(torch.tensor([[1.0, 0, 0, 0, 0, 0]]))
    assert ml[0, 0] == pytest.approx(0.95) and ml[0, 1] == pytest.approx(0.05)


def test_mixup_shares_one_lambda_between_inputs_and_targets():
    torch.manual_seed(0)
    task = make_task(mixup_alpha=0.3)
    audio, video = inputs(batch=4)
    batch = {"audio": audio, "video": video, "has_audio": torch.ones(4, dtype=torch.bool),
             "has_video": torch.tensor([True, False, True, True])}
    target = task.soft_targets(torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(1)
    mixed, mixed_target = task.mixup(batch, target)
    torch.manual_seed(1)  # replay the same draws
    beta = torch.distributions.Beta(0.3, 0.3)
    lam, _ = float(beta.sample()), beta.sample()
    perm = torch.randperm(4)
    torch.testing.assert_close(mixed_target, lam * target + (1 - lam) * target[perm])
    wav = audio.float() / 32768  # the front end's scale for float audio
    torch.testing.assert_close(mixed["audio"], lam * wav + (1 - lam) * wav[perm])
    torch.testing.assert_close(mixed["video"], lam * video.float() + (1 - lam) * video.float()[perm])
    assert torch.equal(mixed["has_video"], batch["has_video"] | batch["has_video"][perm])


def test_modality_mixup_draws_one_lambda_per_modality():
    torch.manual_seed(0)
    task = make_task(mixup_alpha=0.3, modality_mixup=True)
    audio, video = inputs(batch=4)
    target = task.soft_targets(torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(3)
    mixed, mixed_target = task.mixup({"audio": audio, "video": video}, target)
    torch.manual_seed(3)
    beta = torch.distributions.Beta(0.3, 0.3)
    lam_a, lam_v = float(beta.sample()), float(beta.sample())
    perm = torch.randperm(4)
    assert lam_a != lam_v
    wav = audio.float() / 32768
    torch.testing.assert_close(mixed["audio"], lam_a * wav + (1 - lam_a) * wav[perm])
    torch.testing.assert_close(mixed["video"], lam_v * video.float() + (1 - lam_v) * video.float()[perm])
    lam = (lam_a + lam_v) / 2
    torch.testing.assert_close(mixed_target, lam * target + (1 - lam) * target[perm])


def test_no_loss_for_the_missing_modality():
    task = make_task()
    audio, video = inputs(batch=2)
    batch = {"audio": audio, "video": video, "has_audio": torch.tensor([True, True]),
             "has_video": torch.tensor([False, False])}
    losses = task.losses(task(batch), task.soft_targets(torch.tensor([0, 1])), batch)
    assert losses["video"] == 0 and losses["audio"] > 0 and losses["global"] > 0 and losses["fusion"] > 0


def test_modality_flags_zero_the_other_input():
    batch = {"audio": torch.zeros(3, 10), "video": torch.zeros(3, 1, 3, 16, 16)}
    a, v = modality_flags(batch, "audio")
    assert a.all() and not v.any()
    a, v = modality_flags({"video": torch.zeros(2, 1, 3, 16, 16)})
    assert not a.any() and v.all()


def test_cosine_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01


def test_clip_predictions_average_views_per_key():
    from zorro.tasks.metrics import ClipPredictions, classification_scores

    clips = ClipPredictions()
    # clip "a": two views that disagree, averaged -> class 0; clip "b": one view -> class 1
    clips.update(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]), ["a", "a"])
    clips.update(torch.tensor([[0.2, 0.8]]), torch.tensor([1]), ["b"])
    probs, labels = clips.compute()
    assert probs.shape == (2, 2) and sorted(labels.tolist()) == [0, 1]
    row_a = probs[labels == 0][0]
    torch.testing.assert_close(row_a, torch.tensor([0.65, 0.35]))
    assert classification_scores(probs, labels, multi_label=False)["top1"] == 1.0


def test_multilabel_scores_ignore_classes_without_positives():
    from zorro.tasks.metrics import classification_scores

    probs = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.7, 0.3, 0.2]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])  # class 2 has no positives
    scores = classification_scores(probs, labels, multi_label=True)
    assert scores["mAP"] == pytest.approx(1.0) and scores["AUC"] == pytest.approx(1.0)
    assert scores["dprime"] > 3


def test_a_single_clip_can_be_scored():
    from zorro.tasks.metrics import ClipPredictions, classification_scores

    clips = ClipPredictions()
    clips.update(torch.tensor([[0.2, 0.8], [0.4, 0.6]]), torch.tensor([1, 1]), ["a", "a"])
    probs, labels = clips.compute()
    assert classification_scores(probs, labels, multi_label=False)["top1"] == 1.0


def _eval_scores(task, batch, inputs):
    """{head: probabilities} that one evaluation step records for an input setting."""
    from zorro.tasks.metrics import ClipPredictions

    clips = torch.nn.ModuleDict({f"{i}-{n}": ClipPredictions() for i in task.eval_inputs
                                 for n in (*task.output_names, "avg")})
    task.eval_clips["val"] = clips
    with torch.no_grad():
        task._eval_step(batch, "val")
    return {k.split("-")[1]: c.probs[0] for k, c in clips.items() if k.startswith(f"{inputs}-") and c.update_called}


@pytest.mark.parametrize("masking", ["zorro", "two_streams"])
def test_dropped_stream_evaluation_equals_the_zero_filled_one(masking):
    """unimodal_eval=auto runs the present stream alone for isolated own heads: the same scores as the paper's
    zero-filled input, for a fraction of the tokens."""
    torch.manual_seed(0)
    fast = SupervisedTask(backbone=zorro_vit_tiny(masking=masking), dataset=DatasetInfo(num_classes=6, multi_label=False),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)).eval()
    paper = SupervisedTask(backbone=zorro_vit_tiny(masking=masking), dataset=DatasetInfo(num_classes=6, multi_label=False),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), unimodal_eval="zeros").eval()
    paper.load_state_dict(fast.state_dict())
    audio, video = inputs(batch=3)
    batch = {"audio": audio, "video": video, "label": torch.tensor([0, 1, 2]), "key": ["a", "b", "c"]}
    assert fast.eval_settings()["dropped_stream"] == "audio,video"
    for modality in ("audio", "video"):
        got, ref = _eval_scores(fast, batch, modality), _eval_scores(paper, batch, modality)
        assert set(got) == {modality} and {modality, "avg"} <= set(ref)  # only the own head is scored
        torch.testing.assert_close(got[modality], ref[modality], atol=1e-5, rtol=1e-4)
    calls = []  # and it really ran without the other stream: the audio-only pass never embeds video
    fast.backbone.video_embed.forward = lambda *a, **k: calls.append(1)
    fast.eval_inputs = ("audio",)
    assert set(_eval_scores(fast, batch, "audio")) == {"audio"}
    assert calls == []


@pytest.mark.parametrize("masking", ["input_level", "bottleneck"])
def test_entangled_maskings_keep_the_zero_filled_evaluation(masking):
    task = SupervisedTask(backbone=zorro_vit_tiny(masking=masking), dataset=DatasetInfo(num_classes=6, multi_label=False),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)).eval()
    audio, video = inputs(batch=2)
    batch = {"audio": audio, "video": video, "label": torch.tensor([0, 1]), "key": ["a", "b"]}
    assert task.eval_settings()["dropped_stream"] == "none"
    assert set(_eval_scores(task, batch, "audio")) == {"audio", "video", "fusion", "global", "avg"}


def test_zero_input_raw_feeds_silence_and_black_frames():
    from zorro.data.batch import model_inputs

    audio, video = inputs(batch=2)
    batch = {"audio": audio, "video": video}
    raw = model_inputs(batch, "audio", "raw")
    assert torch.equal(raw["audio"], audio) and raw["video"].dtype == video.dtype and not raw["video"].any()
    assert raw["has_video"].all()  # black frames go through the front end like real ones
    normalised = model_inputs(batch, "audio", "normalised")
    assert torch.equal(normalised["video"], video) and not normalised["has_video"].any()  # zeroed after it
    task = make_task(zero_input="raw").eval()
    with torch.no_grad():  # the joint heads see a different input under the two choices
        a, b = task(batch, "audio", "raw"), task(batch, "audio", "normalised")
    assert not torch.allclose(a["global"], b["global"]) and torch.allclose(a["audio"], b["audio"], atol=1e-6)
    with pytest.raises(ValueError, match="zero_input"):
        make_task(zero_input="silence")


def test_two_streams_has_two_heads_and_averages_them():
    """Table 3: "the same number of outputs for fairness, except for the Two Streams which has two outputs"."""
    task = SupervisedTask(backbone=zorro_vit_tiny(masking="two_streams"), dataset=DatasetInfo(num_classes=6, multi_label=False),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)).eval()
    assert set(task.heads) == {"audio", "video"}
    audio, video = inputs()
    probs = task.predict_probs({"audio": audio, "video": video})
    torch.testing.assert_close(probs["avg"], (probs["audio"] + probs["video"]) / 2)


def test_which_samples_a_heads_loss_counts_follows_what_its_output_reads():
    from zorro.tasks.supervised import learns_from

    has_audio, has_video = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    assert torch.equal(learns_from("audio", has_audio, has_video), has_audio)
    assert torch.equal(learns_from("video", has_audio, has_video), has_video)
    for name in ("fusion", "global", "cls"):  # the fusion latents (and an output routing does not know) see all
        assert learns_from(name, has_audio, has_video).all()


def test_the_unimodal_settings_score_the_same_heads_whatever_the_batch_holds():
    """Under DDP every rank must update the same clip metrics (their compute gathers across ranks): a batch in which
    no clip has video (None after the batch hooks) still scores the video head alone in the V setting, with the
    value of the loader's zero-filled frames."""
    torch.manual_seed(0)
    task = make_task().eval()
    audio, video = inputs(batch=2)
    loader_batch = {"audio": audio, "video": torch.zeros_like(video), "label": torch.tensor([0, 1]), "key": ["a", "b"],
                    "has_audio": torch.ones(2, dtype=torch.bool), "has_video": torch.zeros(2, dtype=torch.bool)}
    batch = task.device_batch(loader_batch)
    assert batch["video"] is None
    for inputs_ in ("video", "audio"):
        got, zero_filled = _eval_scores(task, batch, inputs_), _eval_scores(task, loader_batch, inputs_)
        assert set(got) == set(zero_filled) == {inputs_}
        torch.testing.assert_close(got[inputs_], zero_filled[inputs_], atol=1e-6, rtol=1e-5)


def test_cav_mae_smoothing_is_the_official_loaders():
    """smoothing=cav_mae (the official CAV-MAE / AST data loader): a label's class 1 - eps, every other eps / C."""
    ml = make_task(multi_label=True, label_smoothing=0.1, smoothing="cav_mae")
    t = ml.soft_targets(torch.tensor([[1.0, 0, 1, 0, 0, 0]]))
    torch.testing.assert_close(t, torch.tensor([[0.9, 0.1 / 6, 0.9, 0.1 / 6, 0.1 / 6, 0.1 / 6]]))
    single = make_task(label_smoothing=0.1, smoothing="cav_mae").soft_targets(torch.tensor([2]))
    torch.testing.assert_close(single, torch.tensor([[0.1 / 6, 0.1 / 6, 0.9, 0.1 / 6, 0.1 / 6, 0.1 / 6]]))
    with pytest.raises(ValueError, match="smoothing"):
        make_task(smoothing="other")


def test_head_lr_scale_puts_the_new_heads_in_their_own_groups():
    """The official CAV-MAE fine-tuning trains its new head (mlp_head: the backbone's head_norm and the task's
    Linear) at head_lr x the LR; every other parameter keeps the LR and its weight-decay group."""
    from zorro.models import cav_mae_tiny

    task = SupervisedTask(backbone=cav_mae_tiny(decoder_depth=0, head="official", trainable_pos=True),
                          dataset=DatasetInfo(num_classes=6, multi_label=True), head_lr_scale=10,
                          optimizer=functools.partial(torch.optim.Adam, lr=1e-4, weight_decay=0.01))
    task.trainer = None
    optimizer = task.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    head = {id(p) for p in [*task.heads.parameters(), *task.backbone.head_norm.parameters()]}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head or not ids & head
        assert group["lr"] == pytest.approx(1e-3 if ids <= head else 1e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(task.parameters()))
    assert {g["weight_decay"] for g in optimizer.param_groups if {id(p) for p in g["params"]} <= head} == {0.01, 0.0}
def test_loss_reduction_sums_or_averages_the_classes_and_scales_the_gradient_by_their_number():
    """sum_classes (scenic's) is C x mean in value and in gradient; the batch is averaged in both; softmax CE is a
    sum over classes either way."""
    audio, video = inputs(batch=3)
    label = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    batch = {"audio": audio, "video": video, "label": label}
    grads, values = {}, {}
    for reduction in ("mean", "sum_classes"):
        torch.manual_seed(0)
        task = make_task(multi_label=True, loss_reduction=reduction, mixup_alpha=0.0, label_smoothing=0.0).eval()
        loss, _ = task.compute_loss(batch)
        loss.backward()
        values[reduction], grads[reduction] = loss.detach(), task.heads["audio"].weight.grad.clone()
    logits = task.heads["audio"](task(batch)["audio"]).detach()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, label, reduction="none")
    torch.testing.assert_close(task.losses(task(batch), label, batch)["audio"], bce.sum(-1).mean())
    torch.testing.assert_close(values["sum_classes"], 6 * values["mean"])
    torch.testing.assert_close(grads["sum_classes"], 6 * grads["mean"])
    single = {r: make_task(loss_reduction=r).head_loss(logits, torch.eye(6)[:3]) for r in ("mean", "sum_classes")}
    torch.testing.assert_close(single["mean"], single["sum_classes"])
    with pytest.raises(ValueError, match="loss_reduction"):
        make_task(loss_reduction="sum")


@pytest.mark.parametrize("multi_label", [True, False])
def test_view_average_logits_averages_a_clips_views_before_the_probabilities(multi_label):
    """MBT: "average the logits over each view"; Zorro (probs): the views' probabilities averaged."""
    torch.manual_seed(0)
    tasks = {v: make_task(multi_label=multi_label, view_average=v).eval() for v in ("probs", "logits")}
    tasks["logits"].load_state_dict(tasks["probs"].state_dict())
    audio, video = inputs(batch=3)
    label = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 3) if multi_label else torch.tensor([0, 0, 0])
    batch = {"audio": audio, "video": video, "label": label, "key": ["a", "a", "a"]}  # 3 views of one clip
    with torch.no_grad():
        logits = {n: tasks["probs"].heads[n](o) for n, o in tasks["probs"](batch).items()}
    clip = {}
    for view_average, task in tasks.items():
        task.eval_inputs = ("audio_video",)
        with torch.no_grad():
            task._eval_step(batch, "test")
        scores, _ = task.eval_clips["test"]["audio_video-audio"].compute()
        clip[view_average] = task.probabilities(scores) if view_average == "logits" else scores
        task._eval_epoch_end("test")
        torch.testing.assert_close(task.eval_result.predictions["audio_video"][0], _avg_prediction(task, logits))
    probs = tasks["probs"].probabilities
    torch.testing.assert_close(clip["logits"][0], probs(logits["audio"].mean(0)))
    torch.testing.assert_close(clip["probs"][0], probs(logits["audio"]).mean(0))
    assert not torch.allclose(clip["logits"], clip["probs"])


def _avg_prediction(task, logits):
    """The clip's averaged prediction over heads and views, as each view_average defines it."""
    probs = task.probabilities
    heads = torch.stack([probs(x) for x in logits.values()]).mean(0)  # combine=probs: the heads' probabilities
    if task.view_average == "probs":
        return heads.mean(0, keepdim=True)
    return probs(task.logits_of(heads).mean(0, keepdim=True))
