import csv
import json

import pytest
import torch

from zorro.eval.probe import probe_metrics, train_linear
from zorro.checkpoint import load_checkpoint
from zorro.run import build_task, evaluate, train
from zorro.protocol import EVAL_INPUTS
from zorro.data.batch import model_inputs

from .conftest import compose_cfg


def test_train_linear_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 8, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 8).float() * 5 + 100  # offset
    head = train_linear(x, y, num_classes=3, multi_label=False, epochs=100, lr=1e-2)
    assert (head(x).argmax(-1) == y).float().mean() > 0.95  # standardisation folded back into the layer


@torch.no_grad()
def _loop_features(backbone, loader, inputs=EVAL_INPUTS) -> dict:
    """The probe's extraction before trainer.predict: a plain loop on the CPU, the reference for the numbers."""
    backbone.eval()
    feats = {i: {} for i in inputs}
    labels, keys = [], []
    for batch in loader:
        for setting in inputs:
            for name, value in backbone(**model_inputs(batch, setting)).items():
                feats[setting].setdefault(name, []).append(value.float())
        labels.append(batch["label"])
        keys += list(batch["key"])
    return {"features": {i: {n: torch.cat(v) for n, v in f.items()} for i, f in feats.items()},
            "labels": torch.cat(labels), "keys": keys}


def test_linear_probe_of_a_contrastive_checkpoint(tmp_path):
    """Features through trainer.predict: the same numbers as the plain CPU loop, the same probe metrics; and the
    contrastive run's test leaves its retrieval report (RunReports)."""
    cfg = compose_cfg(overrides=["debug=tiny", "task=contrastive", "logger=none", "trainer.max_epochs=1"],
                      output_dir=tmp_path / "run")
    trained = train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "reports" / "test" / "retrieval_recall.csv")))
    assert float(rows[0]["audio->video"]) == pytest.approx(trained["test/a2v_R@1"], abs=1e-4)
    assert float(rows[0]["video->audio"]) == pytest.approx(trained["test/v2a_R@1"], abs=1e-4)

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics = evaluate(compose_cfg("evaluate", overrides=[f"ckpt_path={ckpt}", "protocol=linear_probe",
                                                          "probe.epochs=5"], output_dir=tmp_path / "probe"))
    for inputs in ("audio_video", "audio", "video"):
        for head in ("audio", "video", "fusion", "global", "avg"):
            assert 0.0 <= metrics[f"probe/{inputs}/{head}/top1"] <= 1.0
    saved_test = torch.load(tmp_path / "probe" / "features" / "test.pt", weights_only=False)
    saved_train = torch.load(tmp_path / "probe" / "features" / "train.pt", weights_only=False)
    assert saved_test["features"]["audio"]["global"].shape == (32, 64)  # 32 test clips x tiny width

    state, run = load_checkpoint(ckpt)
    datamodule, task = build_task(run)
    task.load_state_dict(state["state_dict"])
    loop_train = _loop_features(task.backbone, datamodule.feature_dataloader("train"), inputs=("audio_video",))
    loop_test = _loop_features(task.backbone, datamodule.feature_dataloader("test"))
    for saved, loop in ((saved_train, loop_train), (saved_test, loop_test)):
        assert saved["keys"] == loop["keys"] and torch.equal(saved["labels"], loop["labels"])
        assert set(saved["features"]) == set(loop["features"])
        for inputs, outputs in loop["features"].items():
            for name, value in outputs.items():
                assert torch.equal(saved["features"][inputs][name], value), (inputs, name)
    info = datamodule.info
    reference = probe_metrics(loop_train, loop_test, num_classes=info.num_classes, multi_label=info.multi_label,
                              epochs=5, lr=1e-2, weight_decay=0.0, batch_size=256)
    assert metrics == reference  # identical on the CPU, value for value

    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert saved.pop("eval_settings")["zero_input"] == "normalised"  # named in the printed table
    assert saved == metrics
