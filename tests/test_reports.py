import html.parser
import csv
import json

import pytest
import torch

from zorro.eval.run_reports import (confusion, per_class_ap, write_classification_reports, write_retrieval_reports)
from zorro.eval.tables import metric_table, table3_line
from zorro.protocol import own_head


def test_confusion_and_per_class_ap():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    # rows: true class, columns: predicted (argmax); true 1 predicted 0 once, true 2 predicted 1 once
    assert confusion(probs, torch.tensor([0, 1, 1, 2, 2])).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    ap = per_class_ap(probs[:3, :2], torch.tensor([[1, 0], [0, 0], [1, 0]]))
    assert ap[0] == 1.0 and torch.isnan(ap[1])  # no positives: not a number, not a zero


def test_one_table_formatter_for_the_run_table_and_the_table3_line():
    metrics = {"test/audio_video/avg/top1": 1.0, "test/audio/audio/top1": 0.5, "test/video/video/top1": 0.25,
               "test/audio/avg/top1": 0.4, "test/audio_video/fusion/top1": 0.875, "val/audio/audio/top1": 0.1}
    lines = metric_table(metrics, "test").splitlines()
    assert lines[0].split() == ["output", "metric", "V", "A", "A+V"]
    # heads in the order audio, video, fusion, avg; "-" where that input setting was not evaluated
    assert [line.split() for line in lines[1:]] == [["audio", "top1", "-", "50.0", "-"],
                                                    ["video", "top1", "25.0", "-", "-"],
                                                    ["fusion", "top1", "-", "-", "87.5"],
                                                    ["avg", "top1", "-", "40.0", "100.0"]]
    assert table3_line(metrics, "test").splitlines()[0] == "Table 3 (top1, %): V 25.0  A 50.0  A+V 100.0"
    assert own_head("audio", ["audio", "video"]) == "audio" and own_head("audio", ["fusion"]) == "avg"
    assert own_head("audio_video", ["audio"]) == "avg"


def test_reports_are_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20, 3, generator=g).softmax(-1)
    labels = torch.randint(0, 3, (20,), generator=g)
    scores = {"test/audio_video/avg/top1": 0.5, "test/audio/avg/top1": 0.4, "test/video/avg/top1": 0.3,
              "test/audio/audio/top1": 0.45}
    images = write_classification_reports(tmp_path / "single", scores, {"audio_video": (probs, labels)},
                                          class_names=["a", "b", "c"], multi_label=False, stage="test")
    assert [p.name for p in images] == ["confusion_matrix.png"] and images[0].stat().st_size > 1000
    assert (tmp_path / "single" / "table.csv").read_text().splitlines() == [
        "output,metric,V,A,A+V", "audio,top1,-,45.00,-", "avg,top1,30.00,40.00,50.00"]
    assert json.loads((tmp_path / "single" / "table.json").read_text())["avg top1"] == {"V": 0.3, "A": 0.4, "A+V": 0.5}
    rows = list(csv.reader(open(tmp_path / "single" / "confusion_matrix.csv")))
    assert rows[0] == ["true \\ predicted", "a", "b", "c"]
    counts = torch.tensor([[int(c) for c in r[1:]] for r in rows[1:]])
    for t in range(3):  # each cell counts the clips of true class t predicted as class p
        for p in range(3):
            assert counts[t, p] == int(((labels == t) & (probs.argmax(1) == p)).sum())
    multi = (torch.rand(20, 3, generator=g) > 0.5).long()
    images = write_classification_reports(tmp_path / "multi", {}, {"audio_video": (probs, multi)},
                                          class_names=["a", "b", "c"], multi_label=True, stage="test")
    assert images[0].name == "per_class_ap.png" and (tmp_path / "multi" / "per_class_ap.csv").exists()
    z = torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=-1)
    (image,) = write_retrieval_reports(tmp_path / "retrieval", z, z, stage="test")
    rows = (tmp_path / "retrieval" / "retrieval_recall.csv").read_text().splitlines()
    assert rows[1] == "1,1.0000,1.0000" and image.exists()  # identical embeddings: perfect recall


def _job(root, name, masking, metrics, settings=None):
    import json

    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- masking={masking}\n- debug=tiny\n")
    (job / "metrics.json").write_text(json.dumps({**metrics, **({"eval_settings": settings} if settings else {})}))


def test_sweep_report_reads_each_modality_from_its_own_head(tmp_path):
    """The paper's Table 3 reading: V from the video head, A from the audio head (the joint heads lean on the
    zeroed modality, and averaging them in made every masking print the same V column)."""
    from zorro.eval.sweep_report import write_report

    def metrics(v_own, a_own, v_avg, a_avg, av):
        return {"test/video/video/top1": v_own, "test/audio/audio/top1": a_own, "test/video/avg/top1": v_avg,
                "test/audio/avg/top1": a_avg, "test/audio_video/avg/top1": av, "test/audio_video/video/top1": 0.5}

    _job(tmp_path, "0_zorro", "zorro", metrics(1.0, 1.0, 0.25, 0.25, 1.0),
         {"zero_input": "normalised", "unimodal_eval": "zeros", "dropped_stream": "none"})
    _job(tmp_path, "1_input_level", "input_level", metrics(0.25, 0.9, 0.25, 0.25, 1.0),
         {"zero_input": "normalised", "unimodal_eval": "zeros", "dropped_stream": "none"})
    own = write_report(tmp_path)
    assert "| zorro | 100.0 | 100.0 | 100.0 |" in own and "| input_level | 25.0 | 90.0 | 100.0 |" in own
    assert "V = video head, A = audio head" in own and "normalised model input" in own
    assert (tmp_path / "report.md").read_text().strip() == own.strip()
    avg = write_report(tmp_path, reading="avg")  # the all-heads average stays available, named as such
    assert "| zorro | 25.0 | 25.0 | 100.0 |" in avg and "all heads averaged" in avg
    # written beside the paper's reading, not over it
    assert (tmp_path / "report_avg.md").read_text().strip() == avg.strip()
    assert (tmp_path / "report.md").read_text().strip() == own.strip() and (tmp_path / "report_avg.png").exists()


def test_sweep_report_prefers_the_linear_probe_and_falls_back_without_own_heads(tmp_path):
    from zorro.eval.sweep_report import write_report

    _job(tmp_path, "0_zorro", "zorro", {"probe/video/video/mAP": 0.2, "probe/audio/audio/mAP": 0.3,
                                        "probe/audio_video/avg/mAP": 0.4, "val/score": 0.1})
    _job(tmp_path, "1_cav", "cav", {"probe/video/avg/mAP": 0.1, "probe/audio/avg/mAP": 0.15,
                                    "probe/audio_video/avg/mAP": 0.2})
    table = write_report(tmp_path)
    assert table.splitlines()[0] == "| masking | V mAP | A mAP | A+V mAP |"
    assert "| zorro | 20.0 | 30.0 | 40.0 |" in table and "| cav | 10.0 | 15.0 | 20.0 |" in table
    assert "linear probe" in table


def test_run_reports_callback_writes_the_test_reports_of_a_run(tmp_path):
    """train.py's default callbacks: the RunReports callback writes reports/test from the task's eval_result."""
    from zorro.run import train

    from .conftest import compose_cfg

    metrics = train(compose_cfg(overrides=["debug=tiny", "logger=none", "trainer.max_epochs=1"],
                                output_dir=tmp_path))
    out = tmp_path / "reports" / "test"
    rows = list(csv.reader(open(out / "confusion_matrix.csv")))
    counts = torch.tensor([[int(c) for c in r[1:]] for r in rows[1:]])
    assert counts.sum() == metrics["test/num_clips"] == 32  # every test clip once
    assert float(counts.trace() / counts.sum()) == pytest.approx(metrics["test/audio_video/avg/top1"])
    table = {tuple(r[:2]): r[2:] for r in csv.reader(open(out / "table.csv"))}
    assert table["avg", "top1"][2] == f"{100 * metrics['test/audio_video/avg/top1']:.2f}"
    assert table["audio", "top1"][1] == f"{100 * metrics['test/audio/audio/top1']:.2f}"
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert not (tmp_path / "reports" / "val").exists()  # validation epochs write no reports
    # the training curves, with no logger at all: every step's loss (64 clips / 16 = 4 steps) and the
    # validation's loss and per-head scores
    curves = list(csv.DictReader(open(tmp_path / "reports" / "curves.csv")))
    assert [int(r["step"]) for r in curves if r["train/loss"]] == [1, 2, 3, 4]
    (val,) = [r for r in curves if r["val/loss"]]
    assert val["epoch"] == "0" and 0 <= float(val["val/audio_video/avg/top1"]) <= 1 and val["val/video/video/top1"]
    assert (tmp_path / "reports" / "curves.png").stat().st_size > 5000


def _table3_metrics(v, a, av, clips=80):
    return {"test/video/video/top1": v, "test/audio/audio/top1": a, "test/audio_video/avg/top1": av,
            "test/audio_video/audio/top1": av, "test/num_clips": clips}


def _seeded_job(root, number, masking, seed, metrics):
    job = root / f"{number}_masking-{masking}_seed-{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- masking={masking}\n- seed={seed}\n- experiment=table3_demo\n")
    (job / "metrics.json").write_text(json.dumps(metrics))
    return job


class _Images(html.parser.HTMLParser):
    """The cells of every table and the src of every img of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def test_sweep_report_turns_repeated_seeds_into_mean_and_std(tmp_path):
    """Seeds of one masking are one row (mean ± sample std, the seeds listed), with the clip count under the table,
    the bars as report.png and everything in report.html; job 10 sorts after job 9."""
    import statistics

    from zorro.eval.run_reports import write_training_curves
    from zorro.eval.sweep_report import write_report

    scores = {"zorro": [(1.0, 1.0, 1.0), (0.95, 1.0, 1.0), (0.9, 0.975, 1.0), (1.0, 1.0, 1.0)],
              "input_level": [(0.25, 1.0, 1.0), (0.3, 0.9875, 1.0), (0.2625, 1.0, 1.0), (0.25, 1.0, 1.0)]}
    number = 0
    for seed in range(4):  # seed outermost: a row's jobs are not adjacent, and there are more than ten
        for masking, values in scores.items():
            job = _seeded_job(tmp_path, number, masking, seed, _table3_metrics(*values[seed]))
            number += 1
    write_training_curves(job / "reports", [(1, 1.4), (2, 1.2)], [{"step": 2, "epoch": 0, "val/loss": 1.1}])
    _seeded_job(tmp_path, 10, "two_streams", 0, _table3_metrics(0.5, 0.5, 0.5))  # one seed: no spread to show
    table = write_report(tmp_path)
    lines = table.splitlines()
    assert lines[0] == "| masking | V top1 | A top1 | A+V top1 | seeds (seed) |"
    for row, (masking, values) in zip(lines[2:4], scores.items()):
        cells = [f"{100 * statistics.mean(c):.1f} ± {100 * statistics.stdev(c):.1f}" for c in zip(*values)]
        assert row == f"| {masking} | {' | '.join(cells)} | 0,1,2,3 |"
    assert lines[4] == "| two_streams | 50.0 | 50.0 | 50.0 | 0 |"  # one run: no spread to show
    assert "Test clips per run: 80 (one clip = 1.2 points); each row: mean ± sample std over 1-4 runs (seed)." in table
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    page = _Images()
    page.feed((tmp_path / "report.html").read_text())
    # the page's first table is report.md's, cell for cell
    rows = [line for line in lines if line.startswith("| ")]
    assert page.tables[0] == [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    assert len(page.tables) == 1 + 9  # then each job's per-head table
    assert "report.png" in page.images and f"{job.name}/reports/curves.png" in page.images
    assert all((tmp_path / src).is_file() for src in page.images)


def test_sweep_report_logs_its_table_and_figure_to_the_sweeps_wandb_group(tmp_path):
    from omegaconf import OmegaConf

    from zorro.eval.sweep_report import SweepReport

    root = tmp_path / "2026-12-03" / "12-00-00"  # a sweep directory: its jobs' W&B group is 2026-12-03/12-00-00
    for number, (masking, seed) in enumerate((("zorro", 0), ("zorro", 1), ("input_level", 0))):
        _seeded_job(root, number, masking, seed, _table3_metrics(1.0, 1.0, 1.0))
    config = OmegaConf.create({"group": None, "hydra": {"sweep": {"dir": str(root)}},
                               "logger": {"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger",
                                                    "project": "zorro", "offline": True, "name": "${run_name}"}}})
    SweepReport().on_multirun_end(config)
    (run,) = root.glob("wandb/offline-run-*")
    assert len(list(run.glob("files/media/images/sweep/report_*.png"))) == 1
    assert len(list(run.glob("files/media/table/sweep/table_*.table.json"))) == 1
    import time

    log = next(run.glob("*.wandb"))  # the run's record log (name and group as plain strings)
    for _ in range(50):  # W&B's service may still be writing it when finish() returns
        if b"sweep-report" in (records := log.read_bytes()) and b"2026-12-03/12-00-00" in records:
            break
        time.sleep(0.2)
    assert b"sweep-report" in records and b"2026-12-03/12-00-00" in records


@pytest.mark.slow
def test_a_seeded_masking_sweep_reports_mean_and_std_with_its_figure(tmp_path):
    """`train.py -m masking=... seed=0,1`: the sweep ends with one row per masking, mean ± std over the seeds (computed
    here again from each job's metrics.json), the bars and the HTML page with every job's training curves."""
    import statistics

    from .conftest import ROOT, run_script

    proc = run_script(ROOT / "train.py", "-m", "debug=tiny", "masking=zorro,input_level", "seed=0,1", "logger=none",
                      "data.num_train=32", "data.num_val=16", "data.num_test=16", f"hydra.sweep.dir={tmp_path}")
    jobs = sorted(tmp_path.glob("*/metrics.json"))
    assert len(jobs) == 4
    values = {}
    for path in jobs:
        overrides = (path.parent / ".hydra" / "overrides.yaml").read_text()
        masking = "zorro" if "masking=zorro" in overrides else "input_level"
        m = json.loads(path.read_text())
        values.setdefault(masking, []).append([m["test/video/video/top1"], m["test/audio/audio/top1"],
                                               m["test/audio_video/avg/top1"]])
        assert (path.parent / "reports" / "curves.png").stat().st_size > 5000  # every run's training curves
        curves = list(csv.DictReader(open(path.parent / "reports" / "curves.csv")))
        assert sum(1 for r in curves if r["train/loss"]) == 2 * 2  # 2 epochs x 2 steps of 16: every step's loss
        assert sum(1 for r in curves if r["val/loss"]) == 2  # one row per validation
    report = (tmp_path / "report.md").read_text()
    assert report.strip() in proc.stdout  # printed at the end of -m, as written
    for masking, runs in values.items():
        cells = [f"{100 * statistics.mean(c):.1f} ± {100 * statistics.stdev(c):.1f}" for c in zip(*runs)]
        assert f"| {masking} | {' | '.join(cells)} | 0,1 |" in report
    assert "Test clips per run: 16 " in report
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    page = _Images()
    page.feed((tmp_path / "report.html").read_text())
    assert sum(src.endswith("reports/curves.png") for src in page.images) == 4
    assert all((tmp_path / src).is_file() for src in page.images)
