import torch

from zorro.reports import confusion, per_class_ap, write_classification_reports, write_retrieval_reports


def test_confusion_and_per_class_ap():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert confusion(probs, torch.tensor([0, 1, 1])).tolist() == [[1, 0], [1, 1]]
    ap = per_class_ap(probs, torch.tensor([[1, 0], [0, 0], [1, 0]]))
    assert ap[0] == 1.0 and torch.isnan(ap[1])  # no positives: not a number, not a zero


def test_reports_are_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20, 3, generator=g).softmax(-1)
    labels = torch.randint(0, 3, (20,), generator=g)
    scores = {"test/audio_video/avg/top1": 0.5, "test/audio/avg/top1": 0.4, "test/video/avg/top1": 0.3}
    images = write_classification_reports(tmp_path / "single", scores, {"audio_video": (probs, labels)},
                                          class_names=["a", "b", "c"], multi_label=False, stage="test")
    assert [p.name for p in images] == ["confusion_matrix.png"] and images[0].stat().st_size > 1000
    assert (tmp_path / "single" / "table.csv").read_text().splitlines()[1] == "avg top1,30.00,40.00,50.00"
    multi = (torch.rand(20, 3, generator=g) > 0.5).long()
    images = write_classification_reports(tmp_path / "multi", {}, {"audio_video": (probs, multi)},
                                          class_names=["a", "b", "c"], multi_label=True, stage="test")
    assert images[0].name == "per_class_ap.png" and (tmp_path / "multi" / "per_class_ap.csv").exists()
    z = torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=-1)
    (image,) = write_retrieval_reports(tmp_path / "retrieval", z, z, stage="test")
    rows = (tmp_path / "retrieval" / "retrieval_recall.csv").read_text().splitlines()
    assert rows[1] == "1,1.0000,1.0000" and image.exists()  # identical embeddings: perfect recall
