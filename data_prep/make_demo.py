"""Generate a small dataset of real encoded media files for the demo and the tests.

    python -m data_prep.make_demo --out demo_data/videos --num-clips 48 --seed 0

Each clip shows a coloured blob (red or blue) moving over noise with distractor shapes and plays a tone (low or
high) in noise: the 4 classes `{red,blue}_{low,high}` need both eyes and ears (A or V alone: at most 50%).
With `--labels shared` (the Table-3 demo) audio and video carry the *same* label instead: 4 classes, each a
colour and a pitch (`red_low`, `blue_mid`, `green_high`, `yellow_top`), both cues on every clip: each modality
alone is fully informative, and they are redundant. A model whose video tokens read the audio can then learn the
label from the easier modality alone and lose the other when it is missing; one whose streams see only their own
modality cannot. `--video-agreement F` shows the label's colour on only F of the clips (the others show another
class's colour), `--cue-size` sets the coloured square's size, `--fps` the frame rate of the files.
Mostly H.264/AAC mp4 (some at 44.1 / 16 kHz to exercise resampling), some VP9/Opus webm and MPEG-4/MP3 mkv,
a few videos without an audio track, a few audio-only wav files (has_video=false; their label comes from the
tone alone, so they are labelled with the tone and a colour taken in turn — an honest "unknowable" part).
Plus broken inputs that data_prep must report, never crash on: a truncated mp4, a zero-byte file, a text
file named .mp4 and a row whose file does not exist. Awkward names (spaces, dots, unicode) throughout.
Writes `labels.csv` (path,label,split) next to the files.
"""

from __future__ import annotations

import argparse
import csv
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 40), "yellow": (220, 220, 40)}
PITCHES = {"low": 440.0, "mid": 880.0, "high": 1760.0, "top": 3520.0}
DISTRACTORS = [(40, 200, 40), (220, 220, 40), (200, 200, 200)]
# --labels product: colour x pitch, half the label in each modality. shared: one label, in both modalities
# (the distractors then are neither class colour: grey, purple, brown).
LABELS = {
    "product": {"classes": [(c, p) for c in ("red", "blue") for p in ("low", "high")], "distractors": DISTRACTORS},
    "shared": {"classes": [("red", "low"), ("blue", "mid"), ("green", "high"), ("yellow", "top")],
               "distractors": [(200, 200, 200), (150, 80, 200), (120, 80, 40)]},
}


def render_frames(rng: np.random.Generator, colour: str, seconds: float, fps: int, width: int, height: int,
                  distractors=DISTRACTORS, cue_size: float = 1 / 7):
    n = max(1, int(round(seconds * fps)))
    base = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    r = max(4, int(min(width, height) * cue_size))
    pos = rng.uniform([r, r], [width - r, height - r])
    vel = rng.uniform(-2.5, 2.5, size=2) * (fps / 25)
    distractor = distractors[rng.integers(len(distractors))]
    dpos = rng.uniform([r, r], [width - r, height - r])
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(n):
        frame = base.copy()
        frame = np.clip(frame.astype(np.int16) + rng.integers(-12, 12, size=frame.shape), 0, 255).astype(np.uint8)
        frame[(xx - dpos[0]) ** 2 + (yy - dpos[1]) ** 2 < (0.8 * r) ** 2] = distractor
        frame[(np.abs(xx - pos[0]) < r) & (np.abs(yy - pos[1]) < r)] = COLOURS[colour]
        pos += vel
        for i, size in enumerate((width, height)):
            if not r <= pos[i] <= size - r:
                vel[i] = -vel[i]
                pos[i] = min(max(pos[i], r), size - r)
        yield frame


def render_audio(rng: np.random.Generator, pitch: str, seconds: float, sample_rate: int) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    freq = PITCHES[pitch] * rng.uniform(0.95, 1.05)
    tone = 0.25 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t) ** 2
    return (tone * envelope + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _encoder(name: str, fallback: str) -> str:
    """`name` if this PyAV/FFmpeg build can encode with it (libx264 is absent from some builds), else `fallback`."""
    try:
        av.codec.Codec(name, "w")
        return name
    except Exception:
        return fallback


def write_video(path: Path, frames, audio: np.ndarray | None, *, fps: int, width: int, height: int,
                sample_rate: int, vcodec: str, acodec: str | None) -> None:
    vcodec = _encoder(vcodec, "mpeg4")
    acodec = acodec and _encoder(acodec, "aac")
    with av.open(str(path), mode="w") as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        if vcodec in ("libx264", "h264"):
            vs.options = {"preset": "ultrafast", "crf": "28"}
        astream = None
        if audio is not None and acodec:
            astream = out.add_stream(acodec, rate=sample_rate)
            astream.layout = "mono"
        for frame in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if astream is not None:
            fmt = astream.codec_context.format.name if astream.codec_context.format else "fltp"
            samples = np.clip(audio.reshape(1, -1), -1, 1)
            if fmt.startswith("s16"):
                samples = (samples * 32767).astype(np.int16)
            elif fmt.startswith("s32"):
                samples = (samples * 2147483647).astype(np.int32)
            chunk = astream.codec_context.frame_size or 1024
            pts = 0
            for start in range(0, samples.shape[1], chunk):
                piece = np.ascontiguousarray(samples[:, start : start + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format=fmt, layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, pts, Fraction(1, sample_rate)
                pts += piece.shape[1]
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode():
                out.mux(packet)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    sf.write(str(path), audio, sample_rate, subtype="PCM_16")


# (extension, video codec, audio codec, audio sample rate): the mix of containers and codecs in the demo set.
FORMATS = [(".mp4", "libx264", "aac", 48_000)] * 6 + [(".mp4", "libx264", "aac", 44_100), (".mp4", "libx264", "aac", 16_000),
           (".webm", "libvpx-vp9", "libopus", 48_000), (".mkv", "mpeg4", "libmp3lame", 44_100)]
NAMES = ["clip {i:03d}", "clip.{i:03d}.take", "clip_{i:03d}", "clíp-{i:03d} ünïcode", "{i:03d}"]


def make_demo(out: Path, *, num_clips: int = 48, seed: int = 0, seconds: float = 3.0, width: int = 128,
              height: int = 96, fps: int = 25, num_no_audio: int = 3, num_audio_only: int = 3,
              broken: bool = True, labels: str = "product", video_agreement: float | None = None,
              cue_size: float = 1 / 7) -> Path:
    """Write the files and labels.csv into `out`; returns the path of labels.csv."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {sorted(LABELS)}, got {labels!r}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    classes, distractors = LABELS[labels]["classes"], LABELS[labels]["distractors"]
    if video_agreement is None:
        video_agreement = LABELS[labels].get("video_agreement", 1.0)
    vrng = np.random.default_rng(seed + 1)  # its own generator: the other draws stay those of video_agreement=1
    splits = ["train", "val", "test", "train", "train"]  # the k-th clip of each class: 60 / 20 / 20
    for i in range(num_clips):
        colour, pitch = classes[i % len(classes)]  # balanced classes; every split gets every class
        split = splits[(i // len(classes)) % len(splits)]  # every split gets every class
        ext, vcodec, acodec, sr = FORMATS[i % len(FORMATS)]
        name = NAMES[i % len(NAMES)].format(i=i)
        secs = seconds * rng.uniform(0.7, 1.3)
        audio = render_audio(rng, pitch, secs, sr)
        if i < num_no_audio:  # a video without a sound track: has_audio=false
            audio = None
        path = out / f"{name}{ext}"
        shown = colour  # the colour on screen: another class's in 1 - video_agreement of the clips
        if video_agreement < 1 and vrng.random() >= video_agreement:
            shown = [c for c, _ in classes if c != colour][vrng.integers(len(classes) - 1)]
        write_video(path, render_frames(rng, shown, secs, fps, width, height, distractors, cue_size), audio, fps=fps, width=width,
                    height=height, sample_rate=sr, vcodec=vcodec, acodec=acodec)
        rows.append((path.name, f"{colour}_{pitch}", split))
    for j in range(num_audio_only):  # audio-only files (has_video=false), like ESC-50
        colour, pitch = classes[j % len(classes)]
        path = out / f"sound {j:02d}.wav"
        write_wav(path, render_audio(rng, pitch, seconds, 48_000), 48_000)
        rows.append((path.name, f"{colour}_{pitch}", "train"))
    if broken:
        good = out / next(name for name, _, _ in rows if name.endswith(".mp4"))  # mp4: index at the end
        (out / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
        (out / "empty.mp4").write_bytes(b"")
        (out / "notes.mp4").write_text("this is not a video, just text with a video extension\n")
        names = [f"{c}_{p}" for c, p in classes]
        rows += [(name, names[k % len(names)], "train") for k, name in
                 enumerate(("truncated.mp4", "empty.mp4", "notes.mp4", "does not exist.mp4"))]
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-clips", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--cue-size", type=float, default=1 / 7,
                   help="half-width of the coloured square as a fraction of the frame's shorter side")
    p.add_argument("--no-broken", action="store_true", help="leave out the broken files")
    p.add_argument("--num-no-audio", type=int, default=3, help="the first N videos get no audio track")
    p.add_argument("--num-audio-only", type=int, default=3, help="extra audio-only wav files")
    p.add_argument("--labels", choices=sorted(LABELS), default="product",
                   help="product: colour x pitch (A or V alone reach 50%%); shared: the same label in both (Table-3 demo)")
    p.add_argument("--video-agreement", type=float, default=None,
                   help="shared labels: the fraction of clips whose colour matches the label (default 1)")
    args = p.parse_args()
    labels = make_demo(args.out, num_clips=args.num_clips, seed=args.seed, seconds=args.seconds, width=args.width,
                       height=args.height, broken=not args.no_broken, num_no_audio=args.num_no_audio,
                       num_audio_only=args.num_audio_only, labels=args.labels, video_agreement=args.video_agreement,
                       fps=args.fps, cue_size=args.cue_size)
    print(f"wrote {args.num_clips} clips and {labels}")


if __name__ == "__main__":
    main()
