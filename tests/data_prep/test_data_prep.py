import csv
import io
import json
import shutil
import tarfile

import pytest
import soundfile as sf

from data_prep.build import assign_keys, sanitize_key
from data_prep.labels import Row, read_labels

from ..conftest import PREP_ARGS, run_script

BROKEN = {"truncated.mp4": "corrupt", "empty.mp4": "empty_file", "notes.mp4": "not_media",
          "does not exist.mp4": "missing_file"}


def tar_samples(path):
    """{key: {member extension: bytes}} of a shard, read with the standard library."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def all_samples(root):
    manifest = json.loads((root / "manifest.json").read_text())
    out = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            samples = tar_samples(root / shard["name"])
            assert len(samples) == shard["num_samples"], shard  # the manifest counts what is in the tar
            out.update({k: dict(v, split=split) for k, v in samples.items()})
    return manifest, out


def test_every_row_is_written_or_skipped_with_its_reason(demo_videos, demo_shards):
    _, labels = demo_videos
    rows = list(csv.DictReader(open(labels)))
    manifest, samples = all_samples(demo_shards)
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(demo_shards / "skipped.csv"))}
    assert len(rows) == len(samples) + len(skipped)
    assert skipped == BROKEN
    assert manifest["classes"] == ["blue_high", "blue_low", "red_high", "red_low"] and not manifest["multi_label"]
    assert set(manifest["splits"]) == {"train", "val", "test"}
    sources = {json.loads(s["json"])["source"] for s in samples.values()}
    assert sources == {r["path"] for r in rows} - set(BROKEN)


def test_samples_decode_back_with_the_stored_rates(demo_shards):
    _, samples = all_samples(demo_shards)
    no_audio = audio_only = 0
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert meta["key"] == key and meta["split"] == s["split"]
        frames = sorted(k for k in s if k.startswith("f") and k.endswith(".jpg"))
        if meta["has_video"]:
            assert len(frames) == meta["num_frames"] == max(1, int(meta["duration"] * meta["fps"] + 1e-6))
            assert min(meta["width"], meta["height"]) == 48
        else:
            audio_only += 1
            assert not frames
        if meta["has_audio"]:
            wav, sr = sf.read(io.BytesIO(s["flac"]), dtype="int16")
            assert sr == meta["sample_rate"] == 16000 and wav.ndim == 1 and len(wav) == meta["num_samples"]
            assert abs(len(wav) / sr - meta["duration"]) < 0.1
        else:
            no_audio += 1
            assert "flac" not in s
    assert no_audio == 3 and audio_only == 3  # make_demo: 3 videos without sound, 3 wav files


@pytest.mark.parametrize("text,key", [("abc_40.000", "abc_40_000"), ("clíp 003 ünïcode", "clip_003_unicode"),
                                      ("a/b.c d", "a_b_c_d"), ("...", "clip")])
def test_sanitize_key(text, key):
    assert sanitize_key(text) == key


def test_keys_are_unique_and_distinguish_audioset_ids():
    rows = [Row(index=i, path=p, labels=["x"], split="train")
            for i, p in enumerate(["abc_40.000.mp4", "abc_40.001.mp4", "abc_40_000.mp4", "d/e.mp4", "d_e.mp4"])]
    keys = assign_keys(rows)
    assert len(set(keys.values())) == 5
    assert keys[0] == "abc_40_000" and keys[2] == "abc_40_000-1" and keys[4] == "d_e-1"


def test_resume_after_a_kill_gives_the_same_shards(demo_videos, demo_shards, tmp_path):
    videos, labels = demo_videos
    out = tmp_path / "resumed"
    args = ["-m", "data_prep", "--videos", videos, "--labels", labels, "--out", out, "--workers", "2", *PREP_ARGS]
    killed = run_script(*args, "--stop-after-rows", "8", check=False)
    assert killed.returncode == 3  # stopped like a kill: a shard half-written, no manifest
    assert not (out / "manifest.json").exists() and list(out.glob("*.tar"))
    done = run_script(*args)
    assert "rows in = " in done.stdout
    assert not list(out.glob("*.tmp"))
    m1, clean = all_samples(demo_shards)
    m2, resumed = all_samples(out)
    assert m1["splits"] == m2["splits"]
    assert {k: {e: v for e, v in s.items()} for k, s in clean.items()} == resumed  # same samples, same bytes
    assert (out / "skipped.csv").read_text() == (demo_shards / "skipped.csv").read_text()


def test_workers_do_not_change_the_output(demo_videos, demo_shards, tmp_path):
    videos, labels = demo_videos
    run_script("-m", "data_prep", "--videos", videos, "--labels", labels, "--out", tmp_path, "--workers", "1",
               *PREP_ARGS)
    assert all_samples(tmp_path) == all_samples(demo_shards)
    # byte-identical shards and manifest (fixed tar mtimes, deterministic shard boundaries)
    for name in sorted(p.name for p in demo_shards.glob("*.tar")) + ["manifest.json", "skipped.csv"]:
        assert (tmp_path / name).read_bytes() == (demo_shards / name).read_bytes(), name


def test_require_audio_and_split_selection(demo_videos, tmp_path):
    videos, labels = demo_videos
    run_script("-m", "data_prep", "--videos", videos, "--labels", labels, "--out", tmp_path, "--require-audio",
               "--splits", "train", *PREP_ARGS)
    reasons = [r["reason"] for r in csv.DictReader(open(tmp_path / "skipped.csv"))]
    assert reasons.count("missing_audio") >= 1 and "split_not_selected" in reasons
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train"}


def test_bad_command_lines_fail_clearly(demo_videos, tmp_path):
    videos, labels = demo_videos
    proc = run_script("-m", "data_prep", "--videos", tmp_path / "nope", "--labels", labels, "--out", tmp_path,
                      check=False)
    assert proc.returncode == 2 and "--videos" in proc.stderr and "does not exist" in proc.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.mp4,x\n")
    proc = run_script("-m", "data_prep", "--videos", videos, "--labels", bad, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "'path' and 'label'" in proc.stderr


def test_multi_label_csv(demo_videos, tmp_path):
    videos, _ = demo_videos
    wavs = sorted(p.name for p in videos.glob("*.wav"))
    labels = tmp_path / "ml.csv"
    labels.write_text("path,label\n" + "\n".join(f"{w},dog;bark" if i % 2 else f"{w},cat" for i, w in enumerate(wavs)))
    run_script("-m", "data_prep", "--videos", videos, "--labels", labels, "--out", tmp_path / "o", *PREP_ARGS)
    manifest, samples = all_samples(tmp_path / "o")
    assert manifest["multi_label"] and manifest["classes"] == ["bark", "cat", "dog"]
    assert sorted(len(json.loads(s["json"])["label_ids"]) for s in samples.values()) == [1, 1, 2]


def _media(tmp_path, demo_videos, names):
    videos, _ = demo_videos
    wav = next(videos.glob("*.wav"))
    root = tmp_path / "media"
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(wav, root / name)
    return root


def test_official_label_formats(demo_videos, tmp_path):
    root = _media(tmp_path, demo_videos, ["abc_40.000.wav", "xyz_000030.wav", "dancing/kin_000010_000020.wav",
                                          "1-100032-A-0.wav"])
    audioset = tmp_path / "as.csv"
    audioset.write_text("# Segments csv\n# YTID, start_seconds, end_seconds, positive_labels\n"
                        'abc, 40.000, 50.000, "/m/09x0r,/m/05zppz"\nmissing, 1.000, 11.000, "/m/09x0r"\n')
    class_map = tmp_path / "classes.csv"
    class_map.write_text("index,mid,display_name\n0,/m/09x0r,Speech\n1,/m/05zppz,Male speech\n")
    rows = read_labels("audioset", audioset, root, class_map=class_map)
    assert rows[0].path == "abc_40.000.wav" and rows[0].labels == ["Speech", "Male speech"] and rows[1].path is None
    audioset.write_text('# header\nabc, 40.000, 50.000, "/m/09x0r,/m/unknown"\n')
    (row,) = read_labels("audioset", audioset, root, class_map=class_map)
    assert row.problem == "unknown_label"
    (row,) = read_labels("audioset", audioset, root)  # no class map: MIDs are the class names
    assert row.problem is None and row.labels == ["/m/09x0r", "/m/unknown"]

    vgg = tmp_path / "vggsound.csv"
    vgg.write_text("xyz,30,people sneezing,test\nxy,30,dog barking,train\n")
    row, missing = read_labels("vggsound", vgg, root)
    assert row.path == "xyz_000030.wav" and row.split == "test" and row.labels == ["people sneezing"]
    assert missing.path is None  # `xy` must not match `xyz_...` by prefix
    shutil.copy(root / "xyz_000030.wav", root / "pre_000030_000040.wav")  # downloader appended the end time
    vgg.write_text("pre,30,dog barking,train\n")
    (row,) = read_labels("vggsound", vgg, root)
    assert row.path == "pre_000030_000040.wav"

    kinetics = tmp_path / "k400.csv"
    kinetics.write_text("label,youtube_id,time_start,time_end,split\ndancing,kin,10,20,validate\n")
    (row,) = read_labels("kinetics", kinetics, root)
    assert row.path == "dancing/kin_000010_000020.wav" and row.split == "val"

    esc = tmp_path / "esc50.csv"
    esc.write_text("filename,fold,target,category,esc10,src_file,take\n1-100032-A-0.wav,1,0,dog,True,100032,A\n")
    (row,) = read_labels("esc50", esc, root, esc50_test_fold=1)
    assert row.path == "1-100032-A-0.wav" and row.fold == 1 and row.split == "test" and row.labels == ["dog"]


def test_resume_refuses_other_options(demo_videos, demo_shards, tmp_path):
    videos, labels = demo_videos
    out = tmp_path / "o"
    shutil.copytree(demo_shards, out)
    proc = run_script("-m", "data_prep", "--videos", videos, "--labels", labels, "--out", out, "--fps", "3",
                      "--quiet", check=False)
    assert proc.returncode != 0 and "other options" in proc.stderr
