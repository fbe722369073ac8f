import csv
import json

from .conftest import PREP_ARGS, ROOT, run_script


def test_five_fold_style_cross_validation_is_one_sweep_and_one_report(demo_videos, tmp_path):
    videos, labels = demo_videos
    rows = [r for r in csv.DictReader(open(labels))]
    folded = tmp_path / "folds.csv"
    with open(folded, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        w.writerows([r["path"], r["label"], i % 3 + 1] for i, r in enumerate(rows))
    shards = tmp_path / "shards"
    run_script("-m", "data_prep", "--videos", videos, "--labels", folded, "--out", shards, "--split-by-fold",
               *PREP_ARGS)
    assert set(json.loads((shards / "manifest.json").read_text())["splits"]) == {"fold1", "fold2", "fold3"}
    sweep = tmp_path / "sweep"
    sweep_run = run_script(ROOT / "train.py", "-m", "data=shards", f"data.root={shards}", "data.cv_fold=1,2,3",
               "hydra.callbacks.report.cv=data.cv_fold",
               "model=zorro_vit_tiny", "logger=none", "data.num_workers=0", "data.batch_size=2",
               "data.eval_windows=1", "data.eval_crops=1", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}")
    fold_clips = [json.loads(p.read_text())["test/num_clips"] for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(fold_clips) == 3 and sum(fold_clips) == sum(
        json.loads((shards / "manifest.json").read_text())["splits"][f"fold{k}"]["num_samples"] for k in (1, 2, 3))
    assert "| V top1 | A top1 | A+V top1 | folds (data.cv_fold) |" in sweep_run.stdout  # one command
    report = run_script("-m", "zorro.eval.sweep_report", sweep, "--cv", "data.cv_fold").stdout.strip().split("\n\n")[0].splitlines()
    assert report[0] == "| V top1 | A top1 | A+V top1 | folds (data.cv_fold) |"
    assert len(report) == 3 and "±" in report[2] and report[2].rstrip(" |").endswith("1,2,3")
    # the README's `python evaluate.py ckpt_path=logs/multiruns/.../checkpoints/last.ckpt` on a sweep's checkpoint
    # (its job directory's name must parse as a Hydra override value), with the data group as train.py takes it
    # (`data=shards data.root=...`) and a W&B (offline) logger
    job = next(p for p in sorted(sweep.iterdir()) if p.name.startswith("0_data"))
    assert "=" not in job.name and "," not in job.name and "data.cv_fold-1" in job.name
    evaluation = tmp_path / "eval"
    out = run_script(ROOT / "evaluate.py", f"ckpt_path={job / 'checkpoints' / 'last.ckpt'}", "data=shards",
                     f"data.root={shards}", "logger=wandb", f"hydra.run.dir={evaluation}").stdout
    assert "test metrics (%), by output and input modalities:" in out and "Table 3 (top1, %): V " in out
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["test/num_clips"] == fold_clips[0]  # the checkpoint's own data config: fold 1 is its test split
    assert (evaluation / "reports" / "test" / "confusion_matrix.csv").exists()
    assert len(list((evaluation / "wandb").glob("offline-run-*/files/media/images/test/confusion_matrix_*.png"))) == 1
