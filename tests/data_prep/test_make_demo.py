"""The demo data generator: what each label mode puts on screen and in the sound track."""

import csv

import av
import numpy as np
import pytest

from data_prep.make_demo import COLOURS, LABELS, make_demo


def _shown_colour(path) -> str:
    """The class colour that covers most pixels of the first frame (the moving square)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(int)
    counts = {name: int((np.abs(frame - np.array(rgb)).max(-1) < 40).sum()) for name, rgb in COLOURS.items()}
    return max(counts, key=counts.get)


@pytest.mark.parametrize("agreement", [1.0, 0.5])
def test_shared_labels_put_the_label_in_both_modalities(tmp_path, agreement):
    labels = make_demo(tmp_path, num_clips=16, seconds=0.5, width=64, height=48, num_no_audio=0, num_audio_only=0,
                       broken=False, labels="shared", video_agreement=agreement)
    rows = list(csv.DictReader(open(labels)))
    names = {f"{c}_{p}" for c, p in LABELS["shared"]["classes"]}
    assert {r["label"] for r in rows} == names  # 4 classes, each one colour and one pitch
    agree = [_shown_colour(tmp_path / r["path"]) == r["label"].split("_")[0] for r in rows]
    if agreement == 1.0:
        assert all(agree)
    else:  # the weaker modality: some clips show another class's colour
        assert 0.2 <= np.mean(agree) <= 0.8
