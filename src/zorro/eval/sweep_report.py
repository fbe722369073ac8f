"""Turn a multirun directory into one table in the layout of the paper's Table 3.

    python -m zorro.eval.sweep_report logs/multiruns/2026-11-24/12-00-00 [--stage auto] [--reading own]
        [--cv data.cv_fold]

Rows: the swept choices (the overrides that differ between jobs, e.g. masking); columns: V / A / A+V: with only
video, only audio, or both inputs, read as the paper reads them (`--reading own`: V from the video head, A from
the audio head, A+V the average of all heads; `--reading avg`: the all-heads average everywhere). A line under
the table names the choices (which heads, where the absent modality is zeroed). With `--cv KEY` the jobs that
differ only in KEY (e.g. the 5 ESC-50 folds) become one row with mean +- std. Prints Markdown and writes
`report.md` and `report.csv` into the directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .tables import (COLUMNS, READINGS, caption, column_value, metric_name, percent, render, table_stage,
                     write_csv)


def load_jobs(root: Path) -> list[dict]:
    jobs = []
    for metrics_file in sorted(root.glob("*/metrics.json")):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        raw = json.loads(metrics_file.read_text())
        settings = raw.pop("eval_settings", None)
        metrics = {k: v for k, v in raw.items() if isinstance(v, (int, float))}
        jobs.append({"dir": job, "overrides": pairs, "metrics": metrics, "settings": settings})
    return jobs


def swept_keys(jobs: list[dict]) -> list[str]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1] or keys[:1]


def build_table(jobs: list[dict], stage: str = "auto", reading: str = "own",
                cv: str | None = None) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in swept_keys(jobs) if k != cv]
    stages = {j["dir"]: table_stage(j["metrics"], stage) for j in jobs}
    metric = next((m for j in jobs if (m := metric_name(j["metrics"], stages[j["dir"]]))), None)
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
            values = [v for m in members
                      if (v := column_value(m["metrics"], stages[m["dir"]], inputs, reading, metric)) is not None]
            if not values:
                row.append("-")
            elif cv:
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
                row.append(f"{percent(mean)} ± {percent(std)}")
            else:
                row.append(percent(values[0]))
        if cv:
            row.append(",".join(sorted(m["overrides"].get(cv, "?") for m in members)))
        rows.append(row)
    return header, rows


def write_report(root: Path, *, stage: str = "auto", reading: str = "own", cv: str | None = None) -> str:
    jobs = load_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no */metrics.json below {root} (is it a multirun directory of train.py?)")
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    header, rows = build_table(jobs, stage, reading, cv)
    keys = [k for k in swept_keys(jobs) if k != cv]
    captions: dict[str, list[str]] = {}  # caption -> the rows it applies to
    for j in jobs:
        label = ",".join(j["overrides"].get(k, "") for k in keys) or j["dir"].name
        captions.setdefault(caption(reading, j["settings"], table_stage(j["metrics"], stage)), []).append(label)
    lines = [f"Columns: {c}." if len(captions) == 1 else f"Columns ({', '.join(dict.fromkeys(rows_))}): {c}."
             for c, rows_ in captions.items()]
    table = render(header, rows, "markdown") + "\n\n" + "\n".join(lines)
    (root / "report.md").write_text(table + "\n")
    write_csv(root / "report.csv", header, rows)
    return table


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # the report also works without Hydra
    _HydraCallback = object


class SweepReport(_HydraCallback):
    """Hydra callback: at the end of `train.py -m ...`, print the sweep's table (and write report.md/.csv),
    so a sweep over maskings, or over cross-validation folds (`cv: data.cv_fold`), is one command."""

    def __init__(self, stage: str = "auto", reading: str = "own", cv: str | None = None):
        self.stage, self.reading, self.cv = stage, reading, cv

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            table = write_report(root, stage=self.stage, reading=self.reading, cv=self.cv)
        except FileNotFoundError as e:
            print(f"sweep report: {e}")
            return
        print(f"\nsweep report ({root / 'report.md'}):\n{table}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zorro.eval.sweep_report", description=__doc__.splitlines()[0])
    p.add_argument("multirun_dir", type=Path)
    p.add_argument("--stage", default="auto", choices=["auto", "test", "val", "probe"],
                   help="auto: the linear probe's metrics when a run has them, else the test set's")
    p.add_argument("--reading", default="own", choices=READINGS,
                   help="own: V from the video head, A from the audio head, A+V all heads averaged (paper); "
                        "avg: the all-heads average in every column; a head name: that head everywhere")
    p.add_argument("--cv", default=None, help="the override that indexes cross-validation folds, e.g. data.cv_fold")
    args = p.parse_args(argv)
    if not args.multirun_dir.is_dir():
        print(f"error: {args.multirun_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        print(write_report(args.multirun_dir, stage=args.stage, reading=args.reading, cv=args.cv))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
