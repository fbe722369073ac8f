"""Turn a multirun directory into one table in the layout of the paper's Table 3.

    python -m zorro.report logs/multiruns/2026-11-24/12-00-00 [--stage auto] [--reading own] [--cv data.cv_fold]

Rows: the swept choices (the overrides that differ between jobs, e.g. masking); columns: V / A / A+V: with only
video, only audio, or both inputs, read as the paper reads them (`--reading own`: V from the video head, A from
the audio head, A+V the average of all heads; `--reading avg`: the all-heads average everywhere). A line under
the table names the choices (which heads, where the absent modality is zeroed). With `--cv KEY` the jobs that
differ only in KEY (e.g. the 5 ESC-50 folds) become one row with mean +- std. Prints Markdown and writes
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
# How the V and A columns are read. "own" (default): each modality's own head, the video head for V and the
# audio head for A, with the other modality zeroed; A+V is the average of every head. This is the reading under
# which the paper's Table 3 makes sense (two streams A 40.1 above Zorro's 39.7; input level V 9.1 against Zorro's
# 22.5): the fusion and global heads lean on the zeroed modality, and averaging them in hides the difference
# between maskings. "avg": the all-heads average in every column. A head name: that head in every column.
READINGS = ("own", "avg", "audio", "video", "fusion", "global")


def column_head(inputs: str, reading: str) -> str:
    if reading == "own":
        return inputs if inputs in ("audio", "video") else "avg"
    return reading


def metric_name(metrics: dict, stage: str) -> str | None:
    for name in ("mAP", "top1", "R@1"):
        if any(k.startswith(f"{stage}/") and k.endswith(f"/{name}") for k in metrics):
            return name
    return None


def table_stage(metrics: dict, stage: str = "auto") -> str:
    """auto: the linear probe's metrics when the run has them (self-supervised Table 3), else the test set's."""
    if stage != "auto":
        return stage
    return "probe" if any(k.startswith("probe/") for k in metrics) else "test"


def column_value(metrics: dict, stage: str, inputs: str, reading: str, metric: str) -> float | None:
    """The Table-3 cell; an own-head reading falls back to the average for backbones without that head."""
    for head in dict.fromkeys((column_head(inputs, reading), "avg" if reading == "own" else None)):
        if head and (key := f"{stage}/{inputs}/{head}/{metric}") in metrics:
            return metrics[key]
    return None


def caption(reading: str, settings: dict | None, stage: str) -> str:
    """One line naming the choices behind the V and A columns."""
    heads = {"own": "V = video head, A = audio head, A+V = all heads averaged",
             "avg": "every column = all heads averaged"}.get(reading, f"every column = the {reading} head")
    settings = settings or {}
    zero = {"normalised": "the absent modality zeroed at the normalised model input (paper)",
            "raw": "the absent modality zeroed as raw input (silence / black frames)"}[settings.get("zero_input",
                                                                                                  "normalised")]
    dropped = settings.get("dropped_stream", "none")
    fast = ""
    if dropped not in ("none", ""):
        which = " and ".join({"audio": "A", "video": "V"}[d] for d in dropped.split(","))
        fast = f"; {which} computed with the other stream left out (exactly the zero-filled value of the own head)"
        if reading != "own":
            fast += ", other heads not scored there (task.unimodal_eval=zeros scores them)"
    probe = "linear probe on frozen features; " if stage == "probe" else ""
    return f"{probe}{heads}; {zero}{fast}"


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
    table = markdown(header, rows) + "\n\n" + "\n".join(lines)
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
