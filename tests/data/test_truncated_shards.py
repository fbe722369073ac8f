"""Shards that end early or stall, locally and over HTTP (tests/data/faulty_http.py: bodies cut with and without
Content-Length, a server that stops sending): every lost sample is counted as unreadable (data/skipped) with a
warning naming the shard, a stalled read gives up within data.read_timeout, a cut download is never cached, and
an evaluation that scored fewer clips than its split holds is an error. The manifests here hold sample counts
only unless a test adds sizes and digests, as data_prep writes them."""

import hashlib
import json
import logging
import shutil
import tarfile
import time

import pytest

from zorro.config import ConfigError
from zorro.data.reading import ManifestError
from zorro.data.shards import ShardDataModule
from zorro.data.stream import DataError
from zorro.run import evaluate, train

from ..conftest import compose_cfg
from .conftest import make_clips, write_shards
from .faulty_http import FaultyServer

CUTS = ("empty", "no_members", "boundary", "inside", "mid_member")  # what is left of a shard of 4 clips
# clips passed on: at a cut between two samples the last one is dropped too (nothing says it was complete)
READ = {"empty": 0, "no_members": 0, "boundary": 1, "inside": 2, "mid_member": 2}


def cut(path, how: str) -> None:
    """Cut a shard: 0 bytes; a valid tar without members; after 2 whole samples (a member boundary); after the
    first member of the 3rd sample (a boundary inside a sample); in the middle of that sample's 2nd member."""
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    third = [m for m in members if m.name.startswith(keys[2] + ".")]
    if how == "empty":
        data = b""
    elif how == "no_members":
        data = b"\0" * 10240
    elif how == "boundary":
        data = data[:third[0].offset]
    elif how == "inside":
        data = data[:third[1].offset]
    else:
        data = data[:third[1].offset_data + third[1].size // 2]
    path.write_bytes(data)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """train: 2 shards x 4 clips; test: 4 + 2 clips (the same clips in every cut copy)."""
    root = tmp_path_factory.mktemp("whole")
    clips, test = make_clips("tr", 8), make_clips("te", 6)
    write_shards(root, {"train": [clips[:4], clips[4:]], "val": [make_clips("va", 2)], "test": [test[:4], test[4:]]})
    return root


def cut_copy(whole, root, how: str, shards=("train-000000.tar",), digests=False):
    shutil.copytree(whole, root)
    if digests:  # what data_prep records: the size and sha256 of each shard as written
        manifest = json.loads((root / "manifest.json").read_text())
        for split in manifest["splits"].values():
            for s in split["shards"]:
                data = (root / s["name"]).read_bytes()
                s.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        (root / "manifest.json").write_text(json.dumps(manifest))
    sizes = {name: (root / name).stat().st_size for name in shards}
    for name in shards:
        cut(root / name, how)
    return sizes


def module(root, **kw):
    return ShardDataModule(root=str(root), **{"batch_size": 1, "num_workers": 0, "num_frames": 2, "image_size": 32,
                                              "sample_rate": 16000, "shuffle_buffer": 0, "eval_windows": 1,
                                              "eval_crops": 1, **kw})


def read_split(dm, stage="test"):
    """(clip keys, samples counted as unreadable) of one pass over an evaluation split."""
    loader = {"train": dm.feature_dataloader, "test": lambda _: dm.test_dataloader()}[stage](stage)
    keys = [k for batch in loader for k in batch["key"]]
    stream = loader.dataset
    return keys, stream.skipped


def check_counted(keys, skipped, how, caplog, shard="test-000000.tar"):
    assert sorted(keys) == [f"te{i:02d}" for i in range(READ[how])] + ["te04", "te05"]
    assert skipped == 4 - READ[how]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and shard in r.getMessage()]
    assert warning and f"({4 - READ[how]} samples counted as unreadable)" in warning[-1], caplog.text


def test_a_local_shard_cut_at_a_member_boundary_is_counted(whole, tmp_path, caplog):
    cut_copy(whole, tmp_path / "s", "boundary", shards=["test-000000.tar"])
    keys, skipped = read_split(module(tmp_path / "s"))
    check_counted(keys, skipped, "boundary", caplog)


@pytest.mark.slow
@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("where", ["local", "cl", "nocl"])
def test_every_cut_locally_and_over_http_is_counted(whole, tmp_path, caplog, how, where):
    sizes = cut_copy(whole, tmp_path / "s", how, shards=["test-000000.tar"])
    if where == "local":
        keys, skipped = read_split(module(tmp_path / "s"))
    else:
        with FaultyServer(tmp_path) as server:
            server.full_sizes = {f"s/{k}": v for k, v in sizes.items()}
            keys, skipped = read_split(module(f"{server.url}/{where}/s", read_timeout=5, read_retries=1))
    check_counted(keys, skipped, how, caplog)


def test_a_body_cut_short_without_content_length_is_counted(whole, tmp_path, caplog):
    """The silent case over HTTP: the connection closes at a member boundary and nothing says it was early."""
    cut_copy(whole, tmp_path / "s", "boundary", shards=["test-000000.tar"])
    with FaultyServer(tmp_path) as server:
        keys, skipped = read_split(module(f"{server.url}/nocl/s"))
    check_counted(keys, skipped, "boundary", caplog)


def test_a_body_cut_short_of_its_content_length_is_retried_then_counted(whole, tmp_path, caplog):
    sizes = cut_copy(whole, tmp_path / "s", "mid_member", shards=["test-000000.tar"])
    with FaultyServer(tmp_path) as server:
        server.full_sizes = {f"s/{k}": v for k, v in sizes.items()}
        keys, skipped = read_split(module(f"{server.url}/cl/s", read_timeout=5, read_retries=1))
        gets = [r for r in server.requests if r[0].endswith("test-000000.tar")]
    check_counted(keys, skipped, "mid_member", caplog)
    assert len(gets) == 2 and gets[1][1].startswith("bytes=")  # the retry resumed where the body broke off
    assert "the connection closed" in caplog.text and "after 1 retries" in caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_stalled_server_is_given_up_within_the_timeout(whole, tmp_path, caplog, workers):
    shutil.copytree(whole, tmp_path / "s")
    with FaultyServer(tmp_path) as server:
        dm = module(f"{server.url}/plain/s", read_timeout=1, read_retries=1, num_workers=workers)
        dm.root = f"{server.url}/stall/s"  # the manifest came through; the shards stall half-way
        start = time.monotonic()
        keys, skipped = read_split(dm)
        elapsed = time.monotonic() - start
    # per shard: 1 s without data, 1 s backoff, 1 s without data again; then the next shard. The clips that
    # arrived whole before the stall are used, every other one is counted
    assert elapsed < 30 and len(set(keys)) == len(keys) and len(keys) + skipped == 6 and skipped >= 3, \
        (elapsed, keys, skipped)
    if workers == 0:
        assert "no data for 1 s" in caplog.text and "retry 1 of 1" in caplog.text


def test_a_cut_download_is_never_cached(whole, tmp_path, caplog):
    sizes = cut_copy(whole, tmp_path / "s", "boundary", shards=["train-000000.tar"], digests=True)
    cache = tmp_path / "cache"
    with FaultyServer(tmp_path) as server:
        server.full_sizes = {f"s/{k}": v for k, v in sizes.items()}
        dm = module(f"{server.url}/nocl/s", cache_dir=str(cache))
        for _ in range(2):
            keys, skipped = read_split(dm, "train")
            assert sorted(keys) == [f"tr{i:02d}" for i in range(4, 8)] and skipped == 4
        train0 = [r for r in server.requests if r[0].endswith("train-000000.tar")]
        train1 = [r for r in server.requests if r[0].endswith("train-000001.tar")]
    assert len(train0) == 2 and len(train1) == 1  # the cut one fetched again, the whole one read from the cache
    assert sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == ["train-000001.tar"]  # no temp files either
    assert "bytes, the manifest records" in caplog.text and "not cached" in caplog.text


def test_an_old_manifest_checks_cached_copies_by_count(whole, tmp_path, caplog):
    cut_copy(whole, tmp_path / "s", "boundary", shards=["train-000000.tar"])  # counts only
    with FaultyServer(tmp_path) as server:
        dm = module(f"{server.url}/nocl/s", cache_dir=str(tmp_path / "cache"))
        keys, skipped = read_split(dm, "train")
    assert sorted(keys) == [f"tr{i:02d}" for i in range(4, 8)] and skipped == 4
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir()] == ["train-000001.tar"]


# -- wrong results that would run to the end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(whole, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={whole}",
                                 "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=1", "test=false",
                                 "data.eval_windows=1", "data.eval_crops=1"],
                      output_dir=out)
    train(cfg)
    return next((out / "checkpoints").glob("last*.ckpt"))


def evaluate_on(checkpoint, root, out):
    overrides = [f"ckpt_path={checkpoint}", f"data.root={root}", "eval_inputs=[audio_video]"]
    return evaluate(compose_cfg("evaluate", overrides=overrides, output_dir=out), overrides)


def test_an_evaluation_that_scored_fewer_clips_than_the_split_fails(checkpoint, whole, tmp_path):
    assert evaluate_on(checkpoint, whole, tmp_path / "whole")["test/num_clips"] == 6
    cut_copy(whole, tmp_path / "s", "boundary", shards=["test-000000.tar"])
    with pytest.raises(DataError, match="scored 3 of the 6 clips its manifest lists"):
        evaluate_on(checkpoint, tmp_path / "s", tmp_path / "cut")
    assert not (tmp_path / "cut" / "metrics.json").exists()  # no metrics over part of the split


def test_evaluating_on_shards_with_other_classes_is_one_line(checkpoint, whole, tmp_path):
    for classes, what in ((["cat", "dog", "cow"], "only in the checkpoint: bird; only in the data: cow"),
                          (["dog", "cat", "bird"], "the same 3 classes in another order")):
        root = tmp_path / classes[-1]
        shutil.copytree(whole, root)
        manifest = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps(dict(manifest, classes=classes)))
        with pytest.raises(ConfigError, match=what):
            evaluate_on(checkpoint, root, tmp_path / "eval")


def test_a_split_the_manifest_lacks_is_an_error_naming_its_splits(whole, tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_split=trian: .* has no split 'trian'; its manifest has "
                                          r"test, train, val"):
        module(whole, train_split="trian")
    module(whole, val_split="val")  # a default name may be absent: here it is not
    root = tmp_path / "no_train"
    shutil.copytree(whole, root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["splits"]["train"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no training samples in 'train'; its manifest has test, val"):
        module(root).setup("fit")


def test_a_label_id_out_of_range_names_the_clip(tmp_path, caplog):
    clips = make_clips("tr", 4)
    meta = json.loads(clips[2]["json"])
    clips[2]["json"] = json.dumps(dict(meta, label_ids=[7])).encode()
    write_shards(tmp_path, {"test": [clips]})
    keys, skipped = read_split(module(tmp_path))
    assert sorted(keys) == ["tr00", "tr01", "tr03"] and skipped == 1
    assert "tr02 has label id(s) [7], outside the manifest's 3 classes" in caplog.text


@pytest.mark.parametrize("text", ['{"format_version": 1, "classes": ["a", "b"], "multi_la', ""])
def test_a_truncated_manifest_names_the_file(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=r"manifest.json is not valid JSON .*truncated"):
        module(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "classes": ["a"], "multi_label": false, '
                                            '"splits": {"train": {"shards": [{"name": "x.tar"}]}}}')
    with pytest.raises(ManifestError, match="incomplete data_prep manifest"):
        module(tmp_path)
