"""Turn a multirun directory into one table in the layout of the paper's Table 3.

    python -m zorro.report logs/multiruns/2026-11-24/12-00-00 [--stage test] [--head avg] [--cv data.cv_fold]

Rows: the swept choices (the overrides that differ between jobs, e.g. masking); columns: V / A / A+V
(the averaged prediction with only video, only audio, or both inputs). With `--cv KEY` the jobs that differ
only in KEY (e.g. the 5 ESC-50 folds) become one row with mean +- std. Prints Markdown and writes
`report.md` and `report.csv` into the directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

COLUMNS = (("video", "V"), ("audio", "A"), ("audio_video", "A+V"))


def load_jobs(root: Path) -> list[dict]:
    jobs = []
    for metrics_file in sorted(root.glob("*/metrics.json")):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        jobs.append({"dir": job, "overrides": pairs, "metrics": json.loads(metrics_file.read_text())})
    return jobs


def swept_keys(jobs: list[dict]) -> list[str]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1] or keys[:1]


def metric_name(metrics: dict, stage: str, head: str) -> str | None:
    for name in ("mAP", "top1", "R@1"):
        if f"{stage}/audio_video/{head}/{name}" in metrics:
            return name
    return None


def build_table(jobs: list[dict], stage: str = "test", head: str = "avg",
                cv: str | None = None) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in swept_keys(jobs) if k != cv]
    metric = next((m for j in jobs if (m := metric_name(j["metrics"], stage, head))), None)
    header = [*keys, *(f"{label} {metric or ''}".strip() for _, label in COLUMNS)]
    if cv:
        header.append(f"folds ({cv})")
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:  # without --cv every job is its own group
        group = tuple(job["overrides"].get(k, "") for k in keys) if cv else (len(groups),)
        groups.setdefault(group, []).append(job)
    rows = []
    for members in groups.values():
        row = [members[0]["overrides"].get(k, "") for k in keys]
        for inputs, _ in COLUMNS:
            values = [m["metrics"][k] for m in members if (k := f"{stage}/{inputs}/{head}/{metric}") in m["metrics"]]
            if not values:
                row.append("-")
            elif cv:
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
                row.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
            else:
                row.append(f"{100 * values[0]:.1f}")
        if cv:
            row.append(",".join(sorted(m["overrides"].get(cv, "?") for m in members)))
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(root: Path, *, stage: str = "test", head: str = "avg", cv: str | None = None) -> str:
    jobs = load_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no */metrics.json below {root} (is it a multirun directory of train.py?)")
    header, rows = build_table(jobs, stage, head, cv)
    table = markdown(header, rows)
    (root / "report.md").write_text(table + "\n")
    with open(root / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return table


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # the report also works without Hydra
    _HydraCallback = object


class SweepReport(_HydraCallback):
    """Hydra callback: at the end of `train.py -m ...`, print the sweep's table (and write report.md/.csv),
    so a sweep over maskings, or over cross-validation folds (`cv: data.cv_fold`), is one command."""

    def __init__(self, stage: str = "test", head: str = "avg", cv: str | None = None):
        self.stage, self.head, self.cv = stage, head, cv

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            table = write_report(root, stage=self.stage, head=self.head, cv=self.cv)
        except FileNotFoundError as e:
            print(f"sweep report: {e}")
            return
        print(f"\nsweep report ({root / 'report.md'}):\n{table}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("multirun_dir", type=Path)
    p.add_argument("--stage", default="test", choices=["test", "val"])
    p.add_argument("--head", default="avg", help="output head (avg, audio, video, fusion, global)")
    p.add_argument("--cv", default=None, help="the override that indexes cross-validation folds, e.g. data.cv_fold")
    args = p.parse_args(argv)
    if not args.multirun_dir.is_dir():
        print(f"error: {args.multirun_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        print(write_report(args.multirun_dir, stage=args.stage, head=args.head, cv=args.cv))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
