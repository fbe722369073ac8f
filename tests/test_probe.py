import json

import torch

from zorro.eval.probe import train_linear
from zorro.run import evaluate, train

from .conftest import compose_cfg


def test_train_linear_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 8, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 8).float() * 5 + 100  # offset
    head = train_linear(x, y, num_classes=3, multi_label=False, epochs=100, lr=1e-2)
    assert (head(x).argmax(-1) == y).float().mean() > 0.95  # standardisation folded back into the layer


def test_linear_probe_of_a_contrastive_checkpoint(tmp_path):
    cfg = compose_cfg(overrides=["debug=tiny", "task=contrastive", "logger=none", "trainer.max_epochs=1",
                                 "test=false"], output_dir=tmp_path / "run")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics = evaluate(compose_cfg("evaluate", overrides=[f"ckpt_path={ckpt}", "protocol=linear_probe",
                                                          "probe.epochs=5"], output_dir=tmp_path / "probe"))
    for inputs in ("audio_video", "audio", "video"):
        for head in ("audio", "video", "fusion", "global", "avg"):
            assert 0.0 <= metrics[f"probe/{inputs}/{head}/top1"] <= 1.0
    saved = torch.load(tmp_path / "probe" / "features" / "test.pt", weights_only=False)
    assert set(saved["features"]) == {"audio_video", "audio", "video"}
    assert saved["features"]["audio"]["global"].shape == (32, 64)  # 32 test clips x tiny width
    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert saved.pop("eval_settings")["zero_input"] == "normalised"  # named in the printed table
    assert saved == metrics
