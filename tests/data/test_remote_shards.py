"""Shards from a URL: a shard folder served by `python -m http.server` on 127.0.0.1, trained on and evaluated
from http://127.0.0.1:PORT/ (streamed; with data.cache_dir each shard is fetched once); unreachable servers and
missing manifests are one-line errors. The same against moto's S3 server on 127.0.0.1 (s3://, through
AWS_ENDPOINT_URL or data.storage_options)."""

import subprocess
import sys

import pytest

from zorro.config import ConfigError
from zorro.data.reading import shard_url
from zorro.data.shards import ShardDataModule
from zorro.run import evaluate, train

from ..conftest import ROOT, compose_cfg, free_port, run_script, wait_for_port
from .conftest import make_clips, write_shards


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, request log) of an HTTP server for a shard folder; killed at the end."""
    root = tmp_path_factory.mktemp("served")
    clips = make_clips("tr", 8)
    write_shards(root / "as", {"train": [clips[:4], clips[4:]], "val": [make_clips("va", 3)],
                               "test": [make_clips("te", 3)]})
    (root / "empty").mkdir()
    port, log = free_port(), root / "requests.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for_port(proc, port, 30, log.read_text)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.kill()
        proc.wait()


def gets(log, name: str) -> int:
    return sum(f"GET /as/{name} " in line for line in log.read_text().splitlines())


def test_shard_urls():
    assert shard_url("/data/as2m", "train-000000.tar") == "/data/as2m/train-000000.tar"
    assert shard_url("s3://bucket/as2m/", "manifest.json") == "s3://bucket/as2m/manifest.json"
    assert shard_url("https://host/as2m", "a.tar") == "https://host/as2m/a.tar"
    assert shard_url("pipe:aws s3 cp s3://b/as2m/{name} -", "a.tar") == "pipe:aws s3 cp s3://b/as2m/a.tar -"
    with pytest.raises(ConfigError, match="placeholder"):
        shard_url("pipe:cat /x/", "a.tar")


def test_train_and_evaluate_from_an_http_server(server, tmp_path):
    url, log = server
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={url}/as/",
                                 "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=2", "test=false"],
                      output_dir=tmp_path / "run")
    before = gets(log, "train-000000.tar")
    metrics = train(cfg)
    assert "train/loss" in metrics and "val/score" in metrics and metrics["data/skipped"] == 0
    assert gets(log, "train-000000.tar") - before == 2  # streamed again each epoch: nothing kept locally

    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    metrics = evaluate(compose_cfg("evaluate", overrides=[f"ckpt_path={best}"], output_dir=tmp_path / "eval"))
    assert "test/audio_video/avg/top1" in metrics  # the test split, read from the checkpoint's URL
    assert gets(log, "test-000000.tar") >= 1


def test_a_cache_dir_fetches_each_shard_once(server, tmp_path):
    url, log = server
    dm = ShardDataModule(root=f"{url}/as", batch_size=2, num_workers=0, num_frames=4, image_size=32,
                         sample_rate=16000, shuffle_buffer=0, cache_dir=str(tmp_path / "cache"))
    before = gets(log, "train-000001.tar")
    for _ in range(2):
        keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
        assert sorted(keys) == [f"tr{i:02d}" for i in range(8)]
    assert gets(log, "train-000001.tar") - before == 1
    assert len(list((tmp_path / "cache").glob("*-train-00000?.tar"))) == 2


@pytest.mark.parametrize("where,message", [("closed", "cannot read http://127.0.0.1:"),
                                           ("empty", "/empty/manifest.json (FileNotFoundError")])
def test_unreachable_url_or_missing_manifest_is_one_line(server, tmp_path, where, message):
    url, _ = server
    root = f"http://127.0.0.1:{free_port()}/as/" if where == "closed" else f"{url}/empty/"
    proc = run_script(ROOT / "train.py", "model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={root}",
                      f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error in config: cannot read") and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_pipe_root_reads_manifest_and_shards_through_the_command(server, tmp_path):
    url, log = server
    dm = ShardDataModule(root=f"pipe:curl -s -f {url}/as/{{name}}", batch_size=2, num_workers=0, num_frames=4,
                         image_size=32, sample_rate=16000, shuffle_buffer=0)
    assert dm.info.class_names == ("cat", "dog", "bird")
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert sorted(keys) == [f"tr{i:02d}" for i in range(8)]
    with pytest.raises(ConfigError, match="cannot read pipe:false"):
        ShardDataModule(root="pipe:false {name}")


# -- S3-compatible object storage: moto's server on 127.0.0.1 ---------------------------------------------------
BUCKET = "zorro-test"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """(endpoint URL, bucket) of a local S3 server holding the shard folder `as/`; credentials are dummies."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    root = tmp_path_factory.mktemp("s3")
    clips = make_clips("tr", 8)
    write_shards(root, {"train": [clips[:4], clips[4:]], "val": [make_clips("va", 3)], "test": [make_clips("te", 3)]})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(proc, port, 60, lambda: "moto's server did not start")
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for f in root.iterdir():
            s3.upload_file(str(f), BUCKET, f"as/{f.name}")
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses filesystems across tests: not across endpoints
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow  # ~35 s; the fast case below reads the same server both ways
def test_train_and_evaluate_from_a_local_s3_server(s3_env, tmp_path, monkeypatch):
    """docs/cluster_training.md: an S3-compatible store (MinIO, Ceph, moto) through AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root=s3://{BUCKET}/as/",
                                 "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=1", "test=false",
                                 "data.eval_windows=1", "data.eval_crops=1"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert "train/loss" in metrics and metrics["val/num_clips"] == 3 and metrics["data/skipped"] == 0

    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    metrics = evaluate(compose_cfg("evaluate", overrides=[f"ckpt_path={best}", "eval_inputs=[audio_video]"],
                                   output_dir=tmp_path / "eval"))
    assert metrics["test/num_clips"] == 3 and "test/audio_video/avg/top1" in metrics


@pytest.mark.parametrize("route", ["AWS_ENDPOINT_URL", "storage_options"])
def test_shards_from_a_local_s3_server(s3_env, monkeypatch, route):
    """The two routes to an S3-compatible endpoint: botocore's AWS_ENDPOINT_URL, or data.storage_options."""
    if route == "AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    options = {"endpoint_url": s3_env} if route == "storage_options" else None
    dm = ShardDataModule(root=f"s3://{BUCKET}/as", batch_size=2, num_workers=0, num_frames=4, image_size=32,
                         sample_rate=16000, shuffle_buffer=0, storage_options=options)
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert sorted(keys) == [f"tr{i:02d}" for i in range(8)] and dm.skipped() == 0
