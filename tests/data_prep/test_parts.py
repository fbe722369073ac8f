"""data_prep on many machines: `--part K --parts N`, `--merge OUT`, and `--slurm-local` (submitit's local
executor, the `--slurm` path on one machine) on real encoded clips."""
import os
import shutil

import pytest

from zorro.data.reading import read_manifest
from zorro.data.shards import ShardDataModule

from ..conftest import PREP_ARGS, run_script
from .test_data_prep import all_samples


def prep(videos, labels, out, *extra, check=True):
    return run_script("-m", "data_prep", "--videos", videos, "--labels", labels, "--out", out, "--workers", "1",
                      *PREP_ARGS, *extra, check=check)


@pytest.fixture(scope="module")
def three_parts(demo_videos, tmp_path_factory):
    videos, labels = demo_videos
    out = tmp_path_factory.mktemp("three_parts")
    proc = prep(videos, labels, out, "--parts", "3", "--slurm-local")
    assert "submitted 3 of 3 parts" in proc.stdout and "rows in = " in proc.stdout
    return out


def merge(out, check=False):
    return run_script("-m", "data_prep", "--merge", out, check=check)


def test_three_slurm_local_parts_equal_one_machine(demo_shards, three_parts):
    one_manifest, one = all_samples(demo_shards)
    manifest, merged = all_samples(three_parts)
    assert merged == one  # every key, every member's bytes, in the same split
    # the one manifest training reads: today's format, only shard names and boundaries differ
    strip = lambda m: {**m, "splits": {k: v["num_samples"] for k, v in m["splits"].items()}}  # noqa: E731
    assert strip(manifest) == strip(one_manifest) and read_manifest(three_parts) == manifest
    names = [s["name"] for v in manifest["splits"].values() for s in v["shards"]]
    parts = {n.split("-")[1] for n in names}
    assert parts <= {"p00000of00003", "p00001of00003", "p00002of00003"} and len(parts) >= 2
    assert (three_parts / "skipped.csv").read_bytes() == (demo_shards / "skipped.csv").read_bytes()
    # the DataModule evaluates every clip once from the merged shards, as from the one-machine shards
    keys = lambda root: sorted(set(k for b in ShardDataModule(  # noqa: E731
        root=str(root), num_frames=4, image_size=32, sample_rate=16000, batch_size=4, num_workers=0,
        eval_windows=1, eval_crops=1).val_dataloader() for k in b["key"]))
    assert keys(three_parts) == keys(demo_shards) and len(keys(three_parts)) == one_manifest["splits"]["val"]["num_samples"]


def test_merge_refuses_a_missing_part(three_parts, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(three_parts, out)
    (out / "manifest.json").unlink()
    (out / "parts" / "p00001of00003.manifest.json").unlink()  # part 1 never finished
    proc = merge(out)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "part(s) 1 of 3 are missing" in proc.stderr and not (out / "manifest.json").exists()
    shutil.rmtree(out / "parts")
    proc = merge(out)
    assert proc.returncode == 2 and "no finished parts" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_part_made_with_other_options_is_refused_and_a_killed_part_resumes(demo_videos, three_parts, tmp_path):
    videos, labels = demo_videos
    out = tmp_path / "o"
    shutil.copytree(three_parts, out)
    for f in list(out.glob("*-p00001of00003-*.tar")) + list((out / "parts").glob("p00001of00003.*")):
        f.unlink()
    # part 1 again, killed after 2 clips, then resumed: a part resumes from its own journal
    killed = prep(videos, labels, out, "--part", "1", "--parts", "3", "--stop-after-rows", "2", check=False)
    assert killed.returncode == 3 and not (out / "parts" / "p00001of00003.manifest.json").exists()
    assert "missing" in merge(out).stderr
    prep(videos, labels, out, "--part", "1", "--parts", "3")
    assert merge(out, check=True).returncode == 0
    assert all_samples(out)[1] == all_samples(three_parts)[1]

    # the same part made elsewhere with another frame rate, copied in: the merge names the difference
    other = tmp_path / "other"
    prep(videos, labels, other, "--part", "1", "--parts", "3", "--fps", "3")
    shutil.copy(other / "parts" / "p00001of00003.manifest.json", out / "parts")
    proc = merge(out)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "part 1 of 3" in proc.stderr and "other options" in proc.stderr and "fps 3.0 vs 6.25" in proc.stderr
    # --slurm-local into a folder holding parts made with other settings refuses before submitting anything
    proc = prep(videos, labels, out, "--parts", "3", "--slurm-local", "--fps", "3", check=False)
    assert proc.returncode == 2 and "other options" in proc.stderr and "submitted" not in proc.stdout


def test_bad_part_command_lines(demo_videos, demo_shards, tmp_path):
    videos, labels = demo_videos
    for extra, message in ((["--part", "3", "--parts", "3"], "--part must be in 0..2"),
                           (["--part", "0"], "need --parts N"),
                           (["--parts", "2"], "needs --part K")):
        proc = prep(videos, labels, tmp_path / "o", *extra, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    shutil.copytree(demo_shards, tmp_path / "one")
    proc = prep(videos, labels, tmp_path / "one", "--part", "0", "--parts", "2", check=False)
    assert proc.returncode != 0 and "one-machine run" in proc.stderr


def test_slurm_flags_become_one_job_array(tmp_path, monkeypatch):
    """What --slurm submits, seen through a stand-in sbatch (no SLURM here): one array, one task per part."""
    from data_prep.__main__ import parse_args
    from data_prep.slurm import PartJob, executor_for

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):  # sbatch copies the script it is given and answers like SLURM does
        (bin_dir / name).write_text(f'#!/bin/sh\nfor a in "$@"; do f=$a; done; cp "$f" {tmp_path}/job.sh\n'
                                    'echo "Submitted batch job 4242"\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = parse_args(["--videos", "v", "--labels", "l.csv", "--out", str(tmp_path), "--parts", "200", "--slurm",
                       "--slurm-partition", "cpu", "--slurm-cpus", "8", "--slurm-mem-gb", "16", "--slurm-time", "120",
                       "--slurm-array-parallelism", "50"])
    assert args.workers == 8  # --workers follows --slurm-cpus
    jobs = executor_for(args, tmp_path / "logs").map_array(PartJob(), [args] * 200, range(200))
    assert len(jobs) == 200 and jobs[0].job_id == "4242_0"
    script = (tmp_path / "job.sh").read_text()
    for line in ("--array=0-199%50", "--cpus-per-task=8", "--mem=16GB", "--partition=cpu", "--time=120"):
        assert f"#SBATCH {line}\n" in script, line
