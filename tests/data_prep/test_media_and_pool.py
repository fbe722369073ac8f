"""media.decode_media's PyAV fallback, and the worker pool's recovery from crashed / hung decoders."""
import os
import time

import numpy as np
import pytest

from data_prep.build import run_tasks
from zorro.data import media


def _clip(videos, suffix):
    return str(next(p for p in sorted(videos.iterdir()) if p.suffix == suffix and p.stat().st_size > 1000
                    and not p.name.startswith(("truncated", "notes"))))


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_pyav_fallback_matches_decord(demo_videos, monkeypatch, suffix):
    videos, _ = demo_videos
    path = _clip(videos, suffix)
    kw = dict(fps=6.25, short_side=48, sample_rate=16000, max_seconds=10.0)
    ref = media.decode_media(path, **kw)

    def fail(*a, **k):  # what decord does on a file it cannot open
        raise RuntimeError("decord cannot open this file")

    monkeypatch.setattr(media, "_decord_video", fail)
    monkeypatch.setattr(media, "_decord_audio", fail)
    alt = media.decode_media(path, **kw)
    assert alt.frames.shape == ref.frames.shape and alt.has_audio == ref.has_audio
    assert abs(alt.duration - ref.duration) < 0.1
    # same frames picked (both decoders give the same pixels up to colour conversion)
    assert np.abs(alt.frames.astype(int) - ref.frames.astype(int)).mean() < 8
    if ref.has_audio:
        assert abs(len(alt.audio) - len(ref.audio)) < 0.05 * 16000


@pytest.mark.parametrize("name,reason", [("empty.mp4", "empty_file"), ("notes.mp4", "not_media"),
                                         ("does not exist.mp4", "missing_file"), ("truncated.mp4", "corrupt")])
def test_media_errors(demo_videos, name, reason):
    videos, _ = demo_videos
    with pytest.raises(media.MediaError) as e:
        media.decode_media(str(videos / name), fps=6.25, short_side=48, sample_rate=16000)
    assert e.value.reason == reason and e.value.message


def flaky_worker(task):
    """Module-level so worker processes can import it: crashes or hangs on some tasks, like a bad decoder."""
    if task == "crash":
        os._exit(1)  # a segfaulting decoder takes its process down: the pool breaks
    if task == "hang":
        time.sleep(60)
    return ("ok", task)


def test_pool_survives_crashed_and_hung_workers():
    tasks = ["a", "crash", "b", "hang", "c", "d"]
    results = list(run_tasks(tasks, workers=2, timeout=3, fn=flaky_worker))
    assert [t for t, _ in results] == tasks  # order kept, nothing lost
    by_task = dict(results)
    assert by_task["crash"][:2] == ("skip", "decoder_crashed") and by_task["hang"][:2] == ("skip", "timeout")
    assert all(by_task[t] == ("ok", t) for t in "abcd")
