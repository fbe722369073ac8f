"""Multi-node DDP through train.py: two torchrun "nodes" x 1 process on localhost (gloo, c10d rendezvous),
the CPU twin of `srun` / torchrun on a cluster. Also CPU DDP with trainer=ddp's sync_batchnorm left on."""

import os
import subprocess
import sys

import pytest

from .conftest import ROOT, free_port
from .data.conftest import make_clips, write_shards
from .keylog import read


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode_shards")
    clips = make_clips("tr", 12)
    val = make_clips("va", 6)  # 3 with both modalities: contrastive validation needs 2 pairs for its score
    write_shards(root, {"train": [clips[0:4], clips[4:8], clips[8:12]], "val": [val]})
    return root


@pytest.mark.ddp
@pytest.mark.parametrize("task", ["supervised", "contrastive"])
def test_two_nodes_one_process_each_see_disjoint_samples(shards, tmp_path, task):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
           "--local-addr", "127.0.0.1", str(ROOT / "train.py"), f"task={task}", "model=zorro_vit_tiny", "logger=none",
           "data=shards", f"data.root={shards}", "data.num_workers=0", "data.batch_size=2", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.precision=32-true",
           "trainer.max_epochs=1", "test=false", f"hydra.run.dir={tmp_path / 'run'}",
           "+callbacks.keylog._target_=tests.keylog.KeyLog", f"+callbacks.keylog.path={tmp_path}/keys-RANK.jsonl"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-4000:]
    assert "sync_batchnorm off: SyncBatchNorm needs CUDA" in outs[0]  # trainer=ddp's sync_batchnorm, on CPU
    seen = {rank: [k for row in read(tmp_path / f"keys-{rank}.jsonl") for k in row["keys"]] for rank in (0, 1)}
    # 12 clips in shards of 4, two ranks: each rank reads its own shards, an epoch is the smaller share (4 clips)
    assert len(seen[0]) == len(seen[1]) == 4 and len(set(seen[0])) == len(set(seen[1])) == 4, seen
    assert not set(seen[0]) & set(seen[1]), seen
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
