"""data_prep: the manifest records each shard's size and sha256 (what readers check a shard against); paths are
normalised before duplicates are found, and a clip listed in two splits is reported; `--val-fraction` holds out
a seeded, stratified val split from train."""

import csv
import hashlib
import json
from collections import Counter

import pytest

from data_prep.labels import Row, hold_out_val

from ..conftest import PREP_ARGS, run_script
from .test_data_prep import _media, tar_samples


def test_hold_out_val_is_stratified_seeded_and_exact():
    counts = {"a": 50, "b": 30, "c": 20}
    rows = [Row(index=i, path=f"{k}{i}.wav", labels=[k, "z"], split="train")
            for i, k in enumerate(k for k, n in counts.items() for _ in range(n))]
    rows += [Row(index=100, path=None, labels=["a"], split="train"),  # never written: not drawn
             Row(index=101, path="t.wav", labels=["a"], split="test")]
    draw = lambda seed: {r.index for r in rows if r.split == "val"} if hold_out_val(rows, 0.1, seed) else None  # noqa

    def fresh(seed):
        for r in rows:
            r.split = "test" if r.index == 101 else "train"
        return draw(seed)

    first = fresh(0)
    assert len(first) == 10 and fresh(0) == first and fresh(1) != first
    by_class = Counter(rows[i].labels[0] for i in first)
    assert by_class == {"a": 5, "b": 3, "c": 2} and not first & {100, 101}
    # largest remainders: 3 classes of 5 rows at 0.3 -> 4.5 rows, rounded to 4 (not 3 x round(1.5) = 6 or 3)
    small = [Row(index=i, path=f"{i}.wav", labels=["abc"[i // 5]], split="train") for i in range(15)]
    assert hold_out_val(small, 0.3, 0) == 4 and sorted(Counter(r.labels[0] for r in small if r.split == "val")
                                                            .values()) == [1, 1, 2]
    with pytest.raises(ValueError, match="between 0 and 1"):
        hold_out_val(small, 1.5)


@pytest.fixture(scope="module")
def prepared(demo_videos, tmp_path_factory):
    """12 train clips (6 per class), 2 test clips; `./a00.wav` in test is train's `a00.wav`, `sub/../a01.wav`
    repeats train's `a01.wav`; --val-fraction 0.34."""
    tmp = tmp_path_factory.mktemp("val")
    names = [f"a{i:02d}.wav" for i in range(14)]
    media = _media(tmp, demo_videos, names)
    rows = [(n, "cat" if i % 2 else "dog", "train") for i, n in enumerate(names[:12])]
    rows += [(n, "cat", "test") for n in names[12:]] + [("./a00.wav", "dog", "test"), ("sub/../a01.wav", "cat", "train")]
    labels = tmp / "labels.csv"
    labels.write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    out = tmp / "shards"
    proc = run_script("-m", "data_prep", "--videos", media, "--labels", labels, "--out", out, "--val-fraction",
                      "0.34", *PREP_ARGS)
    return out, proc.stdout, labels, media


def test_val_fraction_holds_out_a_stratified_val_split(prepared):
    out, stdout, _, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 8, "val": 4, "test": 2}
    val = [json.loads(s["json"]) for shard in manifest["splits"]["val"]["shards"]
           for s in tar_samples(out / shard["name"]).values()]
    assert Counter(m["labels"][0] for m in val) == {"cat": 2, "dog": 2} and {m["split"] for m in val} == {"val"}
    assert "val: 4 rows held out of train" in stdout


def test_paths_are_normalised_and_cross_split_duplicates_reported(prepared):
    out, stdout, _, _ = prepared
    skipped = {r["path"]: r for r in csv.DictReader(open(out / "skipped.csv"))}
    assert skipped["a00.wav"]["reason"] == "duplicate_across_splits"  # `./a00.wav`: the same clip as train's
    assert "row 0 of split 'train'" in skipped["a00.wav"]["message"]
    assert skipped["a01.wav"]["reason"] == "duplicate_row"
    assert "warning: 1 clip(s) listed in more than one split" in stdout


def test_the_manifest_records_each_shards_size_and_digest(prepared):
    out, _, _, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    for s in shards:
        data = (out / s["name"]).read_bytes()
        assert s["size"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()


def test_val_fraction_refuses_labels_with_a_val_split(prepared, tmp_path):
    _, _, labels, media = prepared
    with_val = tmp_path / "with_val.csv"
    with_val.write_text(labels.read_text().replace("a05.wav,cat,train", "a05.wav,cat,val"))
    proc = run_script("-m", "data_prep", "--videos", media, "--labels", with_val, "--out", tmp_path / "o",
                      "--val-fraction", "0.2", check=False)
    assert proc.returncode == 2 and "already has a val split (1 rows)" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()
