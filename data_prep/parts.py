"""Joining the parts of a partitioned run (`--part K --parts N`) into the one manifest.json / skipped.csv that
training reads (the format of a one-machine run: shard names differ, samples do not)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .build import PARTS_DIR, Part, make_manifest, write_outputs


class MergeError(Exception):
    """A one-line reason the parts cannot be merged."""


def part_manifests(out: Path) -> list[dict]:
    files = sorted((out / PARTS_DIR).glob("p*of*.manifest.json")) if (out / PARTS_DIR).is_dir() else []
    manifests = []
    for f in files:
        try:
            m = json.loads(f.read_text())
            ok = {"index", "parts", "fingerprint", "settings"} <= set(m["part"])
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise MergeError(f"{f} is not a data_prep part manifest; remove it or use a new --out")
        m["part"]["file"] = str(f)
        manifests.append(m)
    return manifests


def settings_diff(a: dict, b: dict) -> str:
    """'fps 6.25 vs 3.0, label rows' : what differs between two parts' settings, for the error message."""
    flat = lambda s: {**s["options"], **{k: v for k, v in s.items() if k != "options"}}  # noqa: E731
    fa, fb = flat(a), flat(b)
    diffs = []
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            diffs.append("label rows" if k == "rows_sha256" else f"{k.replace('_', '-')} {fa.get(k)} vs {fb.get(k)}")
    return ", ".join(diffs) or "fingerprints differ"


def check_compatible(manifests: list[dict], settings: dict | None = None) -> None:
    """All parts made with the same options, number of parts and label rows (and `settings` when given)."""
    if not manifests:
        return
    ref = manifests[0]["part"]
    for m in manifests[1:] if settings is None else manifests:
        p = m["part"]
        other = settings if settings is not None else ref["settings"]
        if p["settings"] != other:
            against = "this command" if settings is not None else f"part {ref['index']} of {ref['parts']}"
            raise MergeError(f"part {p['index']} of {p['parts']} ({p['file']}) was made with other options than "
                             f"{against} ({settings_diff(p['settings'], other)}); re-run it with the same "
                             f"options or use a new --out")


def merge(out: Path) -> dict:
    """Write out/manifest.json and out/skipped.csv from the parts in out/parts/; returns the manifest with a
    summary. Raises MergeError when a part is missing or unfinished, or was made with other options."""
    manifests = part_manifests(out)
    if not manifests:
        raise MergeError(f"{out} has no finished parts ({PARTS_DIR}/p*of*.manifest.json): "
                         f"run `python -m data_prep ... --out {out} --part K --parts N` first")
    check_compatible(manifests)
    n = manifests[0]["part"]["parts"]
    have = {m["part"]["index"] for m in manifests}
    missing = [k for k in range(n) if k not in have]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise MergeError(f"{out}: part(s) {shown} of {n} are missing or unfinished (no {PARTS_DIR}/p*of*.manifest.json); "
                         f"run them (`--part K --parts {n}`) or re-run the --slurm command")
    shards, skipped = [], []
    for m in sorted(manifests, key=lambda m: m["part"]["index"]):
        for split, info in m["splits"].items():
            shards += [dict(s, split=split) for s in info["shards"]]
        with open(Part(m["part"]["index"], n).file(out, "skipped.csv"), newline="") as f:
            reader = csv.reader(f)
            next(reader)
            skipped += [{"row": int(r[0]), "path": r[1], "reason": r[2], "message": r[3]} for r in reader]
    absent = [s["name"] for s in shards if not (out / s["name"]).exists()]
    if absent:
        raise MergeError(f"{out} lacks {len(absent)} shard(s) its parts list ({', '.join(absent[:3])}); "
                         f"re-run those parts into a new --out")
    ref = manifests[0]
    manifest = make_manifest(shards, ref["classes"], ref["multi_label"], ref["part"]["settings"]["options"])
    skipped.sort(key=lambda r: r["row"])
    return write_outputs(out / "manifest.json", out / "skipped.csv", manifest, skipped,
                         ref["part"]["settings"]["rows"])
