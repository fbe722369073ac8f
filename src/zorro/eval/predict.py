"""Top-k classes for your own files with a trained checkpoint.

    python -m zorro.eval.predict --ckpt logs/runs/.../checkpoints/best.ckpt clip.mp4 song.wav [--top-k 5]
        [--json out.json]

Files of any length are decoded exactly as `data_prep` decodes them, cut into windows of the model's span
(`num_frames` at the training frame rate, with audio of the same span; `--stride` seconds apart, a short
file is looped), and the averaged predictions of all windows are printed. A file that cannot be read gets
a one-line reason and the others are still answered (exit status 1 if any file failed).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from hydra.utils import instantiate

from ..checkpoint import checkpoint_run, load_checkpoint, rebuild_config
from ..data.media import MediaError, decode_media
from ..data.transforms import crop_resize, eval_crop_boxes, window_audio, window_frame_indices, window_starts


def load_predictor(ckpt_path: str, overrides=()):
    """(task in eval mode, class names, sampling settings) from a checkpoint written by train.py: its run
    (zorro.checkpoint.rebuild_config), with `overrides` (key=value) on top."""
    ckpt, saved = load_checkpoint(ckpt_path)
    info = checkpoint_run(ckpt)[1]
    if info is None:
        raise ValueError(f"{ckpt_path} lacks the class names; was it written by train.py?")
    run = rebuild_config(saved, overrides).config
    if not hasattr(instantiate(run.task, _partial_=True).func, "predict_probs"):
        raise ValueError("prediction needs a classifier checkpoint (task=supervised)")
    task = instantiate(run.task, backbone=instantiate(run.model), dataset=info, optimizer=None)
    task.load_state_dict(ckpt["state_dict"])
    sampling = {"num_frames": int(run.model.num_frames), "image_size": int(run.model.image_size),
                "sample_rate": int(run.model.sample_rate), "frame_rate": float(run.data.get("frame_rate", 3.125))}
    return task.eval(), info, sampling


@torch.no_grad()
def predict_file(task, path: str, *, num_frames: int, frame_rate: float, image_size: int, sample_rate: int,
                 stride: float | None = None, max_seconds: float = 3600.0, batch_size: int = 8) -> np.ndarray:
    clip = decode_media(path, fps=frame_rate, short_side=image_size, sample_rate=sample_rate, max_seconds=max_seconds)
    window = num_frames / frame_rate
    stride = stride or window
    count = max(1, int(np.floor(max(clip.duration - window, 0) / stride)) + 1)
    starts = window_starts(clip.duration, window, count) if count > 1 else [0.0]
    probs = []
    for i in range(0, len(starts), batch_size):
        views = []
        for start in starts[i : i + batch_size]:
            if clip.has_video:
                idx = window_frame_indices(start=start, num_frames=num_frames, frame_rate=frame_rate,
                                           stored_fps=clip.fps, num_stored=len(clip.frames))
                frames = torch.from_numpy(clip.frames[idx]).permute(0, 3, 1, 2)
                video = crop_resize(frames, eval_crop_boxes(*frames.shape[-2:], 1)[0], image_size)
            else:
                video = torch.zeros(num_frames, 3, image_size, image_size, dtype=torch.uint8)
            audio = torch.zeros(int(round(window * sample_rate)))
            if clip.has_audio:
                audio = torch.from_numpy(window_audio(clip.audio, start=start, seconds=window, sample_rate=sample_rate))
            views.append((video, audio))
        batch = {"video": torch.stack([v for v, _ in views]), "audio": torch.stack([a for _, a in views]).float(),
                 "has_video": torch.full((len(views),), clip.has_video),
                 "has_audio": torch.full((len(views),), clip.has_audio)}
        probs.append(task.predict_scores(batch)["avg"])
    views = torch.cat(probs).mean(0)  # the task's view average: of probabilities, or of logits (MBT)
    return (task.probabilities(views) if task.view_average == "logits" else views).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zorro.eval.predict", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (task=supervised)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--stride", type=float, default=None, help="seconds between windows (default: the window)")
    p.add_argument("--json", default=None, help="also write all predictions to this JSON file")
    args = p.parse_args(argv)
    try:
        task, info, sampling = load_predictor(args.ckpt)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot load {args.ckpt}: {e}", file=sys.stderr)
        return 2
    results, failed = {}, 0
    for path in args.files:
        try:
            probs = predict_file(task, path, stride=args.stride, **sampling)
        except MediaError as e:
            failed += 1
            print(f"{path}: cannot read ({e.reason}): {e.message}", file=sys.stderr)
            results[path] = {"error": e.reason, "message": e.message}
            continue
        top = np.argsort(-probs)[: args.top_k]
        results[path] = {info.class_names[i]: float(probs[i]) for i in top}
        print(f"{path}: " + ", ".join(f"{info.class_names[i]} {probs[i]:.3f}" for i in top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
