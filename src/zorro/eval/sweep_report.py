"""Turn a multirun directory into one table in the layout of the paper's Table 3.

    python -m zorro.eval.sweep_report logs/multiruns/2026-11-24/12-00-00 [--stage auto] [--reading own]
        [--cv data.cv_fold]

Rows: the swept choices (the overrides that differ between jobs, e.g. masking); columns: V / A / A+V: with only
video, only audio, or both inputs, read as the paper reads them (`--reading own`: V from the video head, A from
the audio head, A+V the average of all heads; `--reading avg`: the all-heads average everywhere). A line under
the table names the choices (which heads, where the absent modality is zeroed) and how many test clips each number
stands on. Jobs that differ only in `seed`, or with `--cv KEY` in KEY (e.g. the 5 ESC-50 folds), become one row
with mean ± std. Prints Markdown and writes into the directory `report.md`, `report.csv`, `report.png` (V / A /
A+V bars per row, error bars from the repeats) and `report.html` (the table, the bars, and each job's per-head
table, training curves and test pictures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .tables import (COLUMNS, READINGS, caption, column_value, head_rows, metric_name, percent, render,
                     table_stage, write_csv)


REPEATS = ("seed",)  # swept keys that repeat a setting: their jobs become one row with mean ± std


def _job_order(path: Path) -> tuple:
    """Hydra's job number first (`10_...` after `9_...`), then the name."""
    number = path.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else float("inf"), path.name)


def load_jobs(root: Path) -> list[dict]:
    jobs = []
    for metrics_file in sorted(root.glob("*/metrics.json"), key=lambda f: _job_order(f.parent)):
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


def repeat_keys(jobs: list[dict], cv: str | None = None) -> list[str]:
    """The swept keys whose jobs are repeats of one setting: `cv` (folds) and the seed."""
    swept = swept_keys(jobs)
    return [k for k in dict.fromkeys((cv, *REPEATS)) if k and (k in swept or k == cv)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def aggregate(jobs: list[dict], stage: str = "auto", reading: str = "own", cv: str | None = None) -> dict:
    """The sweep as rows: {"keys", "repeats", "metric", "stages", "rows": [{"label": [values of keys],
    "jobs": [...], "values": {inputs: [one value per job]}, "clips": [test clips per job]}]}. Jobs that differ
    only in a repeat key (cv folds, seeds) share a row; without repeats every job is its own row."""
    repeats = repeat_keys(jobs, cv)
    keys = [k for k in swept_keys(jobs) if k not in repeats]
    stages = {j["dir"]: table_stage(j["metrics"], stage) for j in jobs}
    metric = next((m for j in jobs if (m := metric_name(j["metrics"], stages[j["dir"]]))), None)
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        group = tuple(job["overrides"].get(k, "") for k in keys) if repeats else (len(groups),)
        groups.setdefault(group, []).append(job)
    rows = []
    for members in groups.values():
        values = {inputs: [v for m in members
                           if (v := column_value(m["metrics"], stages[m["dir"]], inputs, reading, metric)) is not None]
                  for inputs, _ in COLUMNS}
        clips = [int(n) for m in members if (n := m["metrics"].get(f"{stages[m['dir']]}/num_clips")) is not None]
        rows.append({"label": [members[0]["overrides"].get(k, "") for k in keys], "jobs": members,
                     "values": values, "clips": clips})
    return {"keys": keys, "repeats": repeats, "metric": metric, "stages": stages, "rows": rows}


def _cell(values: list[float], repeated: bool) -> str:
    if not values:
        return "-"
    if not repeated or len(values) == 1:  # one run has no spread to show
        return percent(values[0])
    mean, std = mean_std(values)
    return f"{percent(mean)} ± {percent(std)}"


def build_table(summary: dict, cv: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the table: the swept keys, V / A / A+V cells, and the repeats of each row."""
    repeats, metric = summary["repeats"], summary["metric"]
    header = [*summary["keys"], *(f"{label} {metric or ''}".strip() for _, label in COLUMNS)]
    header += [f"folds ({k})" if k == cv else f"seeds ({k})" if k == "seed" else k for k in repeats]
    rows = []
    for row in summary["rows"]:
        cells = [*row["label"], *(_cell(row["values"][inputs], bool(repeats)) for inputs, _ in COLUMNS)]
        for k in repeats:
            found = [m["overrides"].get(k, "?") for m in row["jobs"]]
            cells.append(",".join(sorted(found, key=lambda v: (len(v), v))))
        rows.append(cells)
    return header, rows


def clips_line(summary: dict) -> str:
    """How many clips each number stands on, so a difference can be read against one clip's worth."""
    clips = sorted({n for row in summary["rows"] for n in row["clips"]})
    if not clips:
        return ""
    stages = sorted(set(summary["stages"].values()))
    count = f"{clips[0]}" if len(clips) == 1 else f"{clips[0]}-{clips[-1]}"
    line = f"{'/'.join(stages).capitalize()} clips per run: {count} (one clip = {100 / clips[-1]:.1f} points)"
    sizes = sorted({len(row["jobs"]) for row in summary["rows"]})
    if summary["repeats"]:
        n = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        line += f"; each row: mean ± sample std over {n} runs ({', '.join(summary['repeats'])})"
    return line + "."


def figure_title(summary: dict) -> str:
    """e.g. `test top1 (%), mean ± std over 3 runs (seed), 80 clips each`."""
    stage = "/".join(sorted(set(summary["stages"].values())))
    title = f"{stage} {summary['metric'] or 'score'} (%)"
    sizes = sorted({len(row["jobs"]) for row in summary["rows"]})
    if summary["repeats"]:
        title += f", mean ± std over {'-'.join(map(str, dict.fromkeys([sizes[0], sizes[-1]])))} runs " \
                 f"({', '.join(summary['repeats'])})"
    clips = sorted({n for row in summary["rows"] for n in row["clips"]})
    if clips:
        title += f", {'-'.join(map(str, dict.fromkeys([clips[0], clips[-1]])))} clips each"
    return title


def write_figure(path: Path, summary: dict) -> Path:
    """Grouped bars: V / A / A+V per row, error bars = the std over a row's repeats (seeds, folds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [", ".join(r["label"]) or r["jobs"][0]["dir"].name for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 1.5), 3.6))
    width = 0.8 / len(COLUMNS)
    colours = {"video": "#4c72b0", "audio": "#dd8452", "audio_video": "#55a868"}
    for i, (inputs, column) in enumerate(COLUMNS):
        stats = [mean_std(r["values"][inputs]) if r["values"][inputs] else (float("nan"), 0.0) for r in rows]
        xs = [x + (i - 1) * width for x in range(len(rows))]
        means = [100 * m for m, _ in stats]
        errs = [100 * s for _, s in stats] if summary["repeats"] else None
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=column, color=colours[inputs])
        for x, m, e in zip(xs, means, errs or [0.0] * len(means)):
            if m == m:  # not NaN
                ax.text(x, m + e + 1.5, f"{m:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylim(0, 118)
    ax.set_ylabel(f"{summary['metric'] or 'score'} (%)")
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_title(figure_title(summary), fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(root: Path, *, stage: str = "auto", reading: str = "own", cv: str | None = None) -> str:
    """report.md / report.csv (the table), report.png (its bars) and report.html (the table, the bars and each
    job's per-head table and training curves) in `root` (report_<reading>.* for another reading than `own`);
    returns the Markdown."""
    jobs = load_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no */metrics.json below {root} (is it a multirun directory of train.py?)")
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    summary = aggregate(jobs, stage, reading, cv)
    header, rows = build_table(summary, cv)
    keys = summary["keys"]
    captions: dict[str, list[str]] = {}  # caption -> the rows it applies to
    for j in jobs:
        label = ",".join(j["overrides"].get(k, "") for k in keys) or j["dir"].name
        captions.setdefault(caption(reading, j["settings"], table_stage(j["metrics"], stage)), []).append(label)
    lines = [f"Columns: {c}." if len(captions) == 1 else f"Columns ({', '.join(dict.fromkeys(rows_))}): {c}."
             for c, rows_ in captions.items()]
    if line := clips_line(summary):
        lines.append(line)
    table = render(header, rows, "markdown") + "\n\n" + "\n".join(lines)
    name = "report" if reading == "own" else f"report_{reading}"  # another reading beside the paper's, not over it
    (root / f"{name}.md").write_text(table + "\n")
    write_csv(root / f"{name}.csv", header, rows)
    figure = write_figure(root / f"{name}.png", summary)
    write_html(root / f"{name}.html", root, summary, header, rows, lines, figure)
    return table


def write_html(path: Path, root: Path, summary: dict, header: list[str], rows: list[list[str]],
               lines: list[str], figure: Path) -> Path:
    """One page: the table, its bars, then per job its overrides, per-head table and pictures (linked relatively,
    so the sweep directory can be copied or served as it is)."""
    from html import escape

    def table(head: list[str], body: list[list[str]]) -> str:
        cells = "".join(f"<th>{escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>"

    parts = [f"<h1>Sweep {escape(root.name)}</h1>", table(header, rows),
             *(f"<p>{escape(line)}</p>" for line in lines),
             f'<img src="{escape(figure.relative_to(root).as_posix())}" alt="V / A / A+V per row">']
    for row in summary["rows"]:
        for job in row["jobs"]:
            overrides = " ".join(f"{k}={v}" for k, v in job["overrides"].items())
            parts.append(f"<h2>{escape(job['dir'].name)}</h2><p><code>{escape(overrides)}</code></p>")
            head, body = head_rows(job["metrics"], summary["stages"][job["dir"]])
            if body:
                parts.append(table(head, body))
            for picture in ("reports/curves.png", "reports/test/confusion_matrix.png", "reports/test/per_class_ap.png",
                            "reports/test/retrieval_recall.png"):
                if (job["dir"] / picture).exists():
                    src = (job["dir"] / picture).relative_to(root).as_posix()
                    parts.append(f'<img src="{escape(src)}" alt="{escape(picture)}">')
    style = ("body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%;margin:.3em}")
    path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Sweep {escape(root.name)}</title>"
                    f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return path


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # the report also works without Hydra
    _HydraCallback = object


class SweepReport(_HydraCallback):
    """Hydra callback: at the end of `train.py -m ...`, print the sweep's table (and write report.md/.csv/.png/.html),
    so a sweep over maskings, seeds, or cross-validation folds (`cv: data.cv_fold`), is one command. With the W&B
    logger the table and its figure are also logged, as one more run of the sweep's group."""

    def __init__(self, stage: str = "auto", reading: str = "own", cv: str | None = None):
        self.stage, self.reading, self.cv = stage, reading, cv

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            table = write_report(root, stage=self.stage, reading=self.reading, cv=self.cv)
        except FileNotFoundError as e:
            print(f"sweep report: {e}")
            return
        print(f"\nsweep report ({root / 'report.md'}, figure and HTML beside it):\n{table}\n", flush=True)
        log_to_wandb(root, config)


def wandb_settings(config) -> dict | None:
    """The W&B project, group and mode of a sweep's jobs, from its config (None when it logs elsewhere)."""
    from omegaconf import OmegaConf

    logger = OmegaConf.select(config, "logger.wandb", default=None)
    if not logger or "WandbLogger" not in str(logger.get("_target_", "")):
        return None
    group = OmegaConf.select(config, "group", default=None)
    if not group:  # as the jobs name theirs (zorro.run): the sweep directory's last two parts
        group = "/".join(Path(config.hydra.sweep.dir).parts[-2:])
    offline = OmegaConf.select(logger, "offline", default=True)
    return {"project": OmegaConf.select(logger, "project", default="zorro"), "group": str(group),
            "mode": "offline" if offline else "online"}


def log_to_wandb(root: Path, config) -> Path | None:
    """Log report.md's table and report.png as a run named `sweep-report` in the jobs' group; returns its
    directory. W&B problems are reported in one line and never fail the sweep."""
    settings = wandb_settings(config)
    if settings is None:
        return None
    try:
        import wandb

        header, *rows = _read_csv(root / "report.csv")
        run = wandb.init(**settings, name="sweep-report", job_type="sweep_report", dir=str(root), reinit="create_new")
        run.log({"sweep/report": wandb.Image(str(root / "report.png")), "sweep/table": wandb.Table(columns=header,
                                                                                                   data=rows)})
        run.summary["sweep_dir"] = str(root)
        run.finish()
        return Path(run.dir).parent
    except Exception as e:  # noqa: BLE001 - a report's upload must not fail a finished sweep
        print(f"sweep report: not logged to W&B ({type(e).__name__}: {e})", flush=True)
        return None


def _read_csv(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


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
