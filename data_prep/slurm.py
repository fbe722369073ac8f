"""`--slurm` / `--slurm-local`: the N parts as one submitit job array (one array task per part), merged when all
finish. Parts already finished with the same settings are not resubmitted, so re-running the command after a
failure redoes only what is missing; an interrupted part resumes from its journal."""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import submitit

from .build import PARTS_DIR, rows_settings
from .parts import MergeError, check_compatible, merge, part_manifests
from .prepare import CommandError, load_rows, options_of, run, splits_of


class PartJob(submitit.helpers.Checkpointable):
    """One part in one array task. Checkpointable: on preemption or at the time limit submitit requeues the task
    (up to 3 times), and the requeued task resumes the part from its journal."""

    def __call__(self, args: argparse.Namespace, index: int) -> dict:
        args = copy.copy(args)
        args.part, args.slurm, args.slurm_local, args.quiet = index, False, False, True
        try:
            return run(args)["summary"]
        except SystemExit as e:  # the journal's refusals; submitit reports exceptions, not exits
            raise RuntimeError(str(e)) from None


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def executor_for(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    """The --slurm-* flags as submitit parameters (one array task per part; slurm_* ones are ignored locally)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.slurm_local else "slurm")
    executor.update_parameters(name="data_prep", timeout_min=args.slurm_time, cpus_per_task=args.slurm_cpus
                               or args.workers, mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
                               slurm_array_parallelism=args.slurm_array_parallelism)
    return executor


def submit(args: argparse.Namespace) -> dict:
    if args.slurm and args.slurm_local:
        raise CommandError("choose one of --slurm and --slurm-local")
    if args.slurm and shutil.which("sbatch") is None:
        raise CommandError("--slurm needs sbatch on PATH (run it on a SLURM login node); "
                           "--slurm-local runs the same parts on this machine")
    args = copy.copy(args)  # absolute paths: array tasks may start in another directory
    for k in ("videos", "labels", "out", "class_map"):
        if getattr(args, k) is not None:
            setattr(args, k, getattr(args, k).resolve())
    out: Path = args.out
    rows = load_rows(args)  # a bad label file fails here, once, not in N tasks
    settings = rows_settings(rows, options_of(args), splits_of(args), args.parts)
    try:
        finished = part_manifests(out)
        check_compatible(finished, settings)
    except MergeError as e:
        raise CommandError(str(e)) from None
    todo = sorted(set(range(args.parts)) - {m["part"]["index"] for m in finished})
    if not todo:
        print(f"all {args.parts} parts are finished with these settings; merging", flush=True)
    else:
        folder = out / PARTS_DIR / "submitit"
        jobs = executor_for(args, folder).map_array(PartJob(), [args] * len(todo), todo)
        print(f"submitted {len(todo)} of {args.parts} parts as job array {jobs[0].job_id.split('_')[0]} "
              f"(logs: {folder}); waiting for them to finish", flush=True)
        failed = []
        for k, job in zip(todo, jobs):
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 - submitit raises its own errors with the task's traceback
                failed.append((k, job, e))
        if failed:
            k, job, e = failed[0]
            raise CommandError(f"{len(failed)} of {len(todo)} parts failed (first: part {k}: {_last_line(e)}; "
                               f"log: {job.paths.stderr}); re-run the same command to redo only the failed parts")
    try:
        manifest = merge(out)
    except MergeError as e:
        raise CommandError(str(e)) from None
    manifest["summary"]["held_out_val"] = args.held_out
    return manifest
