"""The audio a view receives: its configured length (data.audio_seconds), placed on the frames' window (or at the clip
start for CAV-MAE), looped when the clip is shorter; on FLAC / JPEG shards (tests/data/conftest.py), and with the
settings of the ESC-50 and MBT recipes."""

import io
import random

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate

from zorro.data.shards import ShardDataModule
from zorro.data.transforms import audio_span

from ..conftest import compose_cfg
from .conftest import FPS, SR, clip_members, write_shards


def full_audio(raw) -> np.ndarray:
    wav, sr = sf.read(io.BytesIO(raw.get("flac") or raw.get("wav")), dtype="int16")
    assert sr == SR
    return wav


def looped(wav: np.ndarray, start: float, seconds: float) -> np.ndarray:
    return wav[(int(round(start * SR)) + np.arange(int(round(seconds * SR)))) % wav.size]


def views(module: ShardDataModule, raw, stage="eval", seed=0):
    return list(module.samplers[stage](raw, random.Random(seed)))


def module(root, **kw):
    base = dict(root=str(root), num_frames=4, frame_rate=3.125, image_size=32, sample_rate=SR, batch_size=1,
                num_workers=0, eval_crops=1, flip=False, color_prob=0.0)
    return ShardDataModule(**{**base, **kw})


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 3 s clip, a 1 s clip and a 10 s clip with audio and frames (frame i is filled with 10 * i)."""
    samples = {s: clip_members(f"c{int(s)}", seconds=s, label_ids=[0], seed=int(s)) for s in (3.0, 1.0, 10.0)}
    root = tmp_path_factory.mktemp("span_shards")
    write_shards(root, {"test": [list(samples.values())]})
    return root, samples


def test_audio_is_centred_on_the_frames_and_kept_inside_the_clip(clips):
    root, samples = clips
    raw = samples[3.0]
    m = module(root, audio_seconds=2.0, eval_windows=2)  # frames 1.28 s, audio 2 s: windows at 0 and 1.72 s
    got = views(m, raw)
    wav = full_audio(raw)
    assert len(got) == 2 and all(v["audio"].shape == (2 * SR,) for v in got)
    # centres 0.64 s and 2.36 s; the 2 s spans [-0.36, 1.64) and [1.36, 3.36) are moved inside the clip
    np.testing.assert_array_equal(got[0]["audio"].numpy(), wav[: 2 * SR])
    np.testing.assert_array_equal(got[1]["audio"].numpy(), wav[1 * SR: 3 * SR])


def test_a_clip_shorter_than_the_audio_is_looped_around_the_frames(clips):
    root, samples = clips
    raw = samples[1.0]
    (view,) = views(module(root, audio_seconds=2.0, eval_windows=1), raw)  # frames [0, 1.28) loop the 1 s clip
    wav = full_audio(raw)
    np.testing.assert_array_equal(view["audio"].numpy(), looped(wav, -0.36, 2.0))
    # the middle of the view's audio is the clip at the middle of its frames (0.64 s): still in sync
    assert view["audio"][SR].item() == wav[int(round(0.64 * SR))]


def test_audio_equal_to_the_window_is_the_frames_span(clips):
    root, samples = clips
    raw = samples[10.0]
    m = module(root, audio_seconds=None, eval_windows=3)  # default: the frames' 1.28 s
    wav = full_audio(raw)
    starts = [0.0, (10 - 1.28) / 2, 10 - 1.28]
    for view, start in zip(views(m, raw), starts):
        np.testing.assert_array_equal(view["audio"].numpy(), looped(wav, start, 1.28))


def test_clip_start_gives_every_view_the_first_seconds(clips):
    root, samples = clips
    raw = samples[3.0]
    m = module(root, num_frames=1, frame_rate=1.0, audio_seconds=4.0, audio_align="clip_start", eval_windows=3)
    got = views(m, raw)
    wav = full_audio(raw)
    assert len(got) == 3
    for view in got:  # CAV-MAE: one frame per view, always the clip's first 4 s (the 3 s clip looped)
        np.testing.assert_array_equal(view["audio"].numpy(), looped(wav, 0.0, 4.0))


def test_training_views_have_the_configured_length_and_follow_their_frames(clips):
    root, samples = clips
    raw = samples[10.0]
    m = module(root, audio_seconds=2.0)
    wav = full_audio(raw)
    for seed in range(4):
        (view,) = views(m, raw, stage="train", seed=seed)
        assert view["audio"].shape == (2 * SR,)
        start = random.Random(seed).uniform(0, 10.0 - 1.28)  # the sampler's first draw: the frames' window
        assert view["video"][0].float().mean().item() == pytest.approx(10 * round(start * FPS) % 256, abs=3)
        expected = audio_span(start, window=1.28, seconds=2.0, duration=10.0)
        assert expected == pytest.approx(min(max(start - 0.36, 0.0), 8.0), abs=1e-5)  # centred, inside the clip
        np.testing.assert_array_equal(view["audio"].numpy(), looped(wav, expected, 2.0))


def test_bad_audio_settings_fail_in_one_line(clips):
    root, _ = clips
    with pytest.raises(ValueError, match="audio_align must be one of"):
        module(root, audio_align="centre")
    with pytest.raises(ValueError, match="audio_seconds must be positive"):
        module(root, audio_seconds=-1.0)


def recipe_data(name, root, tmp_path, **overrides):
    cfg = compose_cfg(overrides=[f"experiment={name}", f"data.root={root}", "init_from=/ckpt", "pretrained=/w",
                                 "data.cv_fold=null", "data.num_workers=0", "data.batch_size=1", "data.image_size=32",
                                 "model.sample_rate=16000"], output_dir=tmp_path)
    return instantiate(cfg.data, **overrides), cfg


def test_esc50_one_eval_view_covers_the_whole_clip_looped_to_the_input_length(tmp_path):
    """ESC-50 at the recipe's settings: a 5 s clip gives one evaluation view whose audio is the whole clip, looped to
    the pre-training length; training views have that length too."""
    raw = clip_members("esc", seconds=5.0, label_ids=[1], has_video=False, seed=3)
    root = tmp_path / "esc50"
    write_shards(root, {"train": [[raw]], "test": [[raw]]})
    data, cfg = recipe_data("esc50", root, tmp_path)
    n = int(round(cfg.model.audio_seconds * SR))
    assert cfg.model.audio_seconds > 5.0 and data.samplers["eval"].audio_seconds == cfg.model.audio_seconds
    test = [b for b in data.test_dataloader()]
    assert len(test) == 1 and test[0]["audio"].shape == (1, n)  # one view (eval_windows 1, eval_crops 1)
    wav = full_audio(raw)
    np.testing.assert_array_equal(test[0]["audio"][0, : wav.size].numpy(), wav)  # the whole clip ...
    np.testing.assert_array_equal(test[0]["audio"][0, wav.size:].numpy(), wav[: n - wav.size])  # ... then looped
    assert not test[0]["has_video"].any()
    train = next(iter(data.train_dataloader()))
    assert train["audio"].shape == (1, n)


def test_mbt_views_get_8_s_of_audio_under_8_frames_spanning_the_same_8_s(clips, tmp_path):
    root, samples = clips
    raw = samples[10.0]
    data, cfg = recipe_data("mbt_as500k", root, tmp_path, num_frames=8)
    got = views(data, raw)
    wav = full_audio(raw)
    assert len(got) == 4  # MBT: 4 test crops (temporal)
    for view, start in zip(got, [0.0, 2 / 3, 4 / 3, 2.0]):
        np.testing.assert_array_equal(view["audio"].numpy(), looped(wav, start, 8.0))
        frame_index = [round((start + k / cfg.data.frame_rate) * FPS) for k in range(8)]  # one frame per second
        brightness = view["video"].float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(brightness, torch.tensor([10.0 * i % 256 for i in frame_index]), atol=3, rtol=0)
