"""The one V / A / A+V table formatter: the run's per-head table and Table-3 line (train.py / evaluate.py), the
sweep report's Markdown/CSV and a run report's table.csv all read metrics and print cells through here.

Metric keys are zorro.protocol's `<stage>/<inputs>/<head>/<metric>`."""

from __future__ import annotations

import csv
from pathlib import Path

from ..protocol import metric_key, own_head, parse_metric_key

COLUMNS = (("video", "V"), ("audio", "A"), ("audio_video", "A+V"))
HEAD_ORDER = {"audio": 0, "video": 1, "fusion": 2, "global": 3, "avg": 4}
# How the V and A columns are read. "own" (default): each modality's own head, the video head for V and the
# audio head for A, with the other modality zeroed; A+V is the average of every head. This is the reading under
# which the paper's Table 3 makes sense (two streams A 40.1 above Zorro's 39.7; input level V 9.1 against Zorro's
# 22.5): the fusion and global heads lean on the zeroed modality, and averaging them in hides the difference
# between maskings. "avg": the all-heads average in every column. A head name: that head in every column.
READINGS = ("own", "avg", "audio", "video", "fusion", "global")


def column_head(inputs: str, reading: str) -> str:
    return own_head(inputs) if reading == "own" else reading


def metric_name(metrics: dict, stage: str) -> str | None:
    for name in ("mAP", "top1", "R@1"):
        if any((key := parse_metric_key(k)) and key.stage == stage and key.metric == name for k in metrics):
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
        if head and (key := metric_key(stage, inputs, head, metric)) in metrics:
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


def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def cells(metrics: dict[str, float], stage: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(head, metric): {inputs: value}} of `stage`, heads in the order audio, video, fusion, global, avg."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        parsed = parse_metric_key(key)
        if parsed and parsed.stage == stage:
            found.setdefault((parsed.head, parsed.metric), {})[parsed.inputs] = value
    return {hm: found[hm] for hm in sorted(found, key=lambda hm: (HEAD_ORDER.get(hm[0], 9), hm))}


def head_rows(metrics: dict[str, float], stage: str, digits: int = 1) -> tuple[list[str], list[list[str]]]:
    """Rows: every (head, metric) of `stage`; columns: V / A / A+V in percent ("-": that input not evaluated)."""
    rows = [[head, metric, *(percent(row.get(i), digits) for i, _ in COLUMNS)]
            for (head, metric), row in cells(metrics, stage).items()]
    return ["output", "metric", *(label for _, label in COLUMNS)], rows


def render(header: list[str], rows: list[list[str]], style: str = "text", labels: int = 2) -> str:
    """text: aligned columns (the first `labels` left-aligned, the numbers right-aligned); markdown: a table."""
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    minimum = [10, 6][:labels] + [7] * (len(header) - labels)
    widths = [max(m, *(len(r[i]) for r in [header, *rows])) for i, m in enumerate(minimum)]
    return "\n".join(" ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def metric_table(metrics: dict[str, float], stage: str) -> str:
    """Rows: outputs (and their average); columns: V / A / A+V inputs (the paper's Table 3 layout)."""
    header, rows = head_rows(metrics, stage)
    return render(header, rows) if rows else ""


def table3_line(metrics: dict[str, float], stage: str, settings: dict | None = None) -> str:
    """The run's row of the paper's Table 3 (V / A / A+V, read as the paper reads them) and what it means."""
    metric = metric_name(metrics, stage)
    if metric is None:
        return ""
    row = "  ".join(f"{label} {percent(column_value(metrics, stage, inputs, 'own', metric))}"
                    for inputs, label in COLUMNS)
    return f"Table 3 ({metric}, %): {row}\n  ({caption('own', settings, stage)})"
