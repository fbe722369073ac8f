"""Training-step throughput and peak memory of the backbones, as ratios to Zorro-ViT (paper, section 4:
Swin ~25% faster than ViT, HiP the fastest). Not a test; prints what it measured.

    python benchmarks/backbones.py                    # GPU: base sizes, bf16, each model's own input config
    python benchmarks/backbones.py --size tiny        # CPU: the tiny variants on the same tiny inputs
    python benchmarks/backbones.py --models zorro_vit zorro_swin --batch 32 --compile

Each model gets the input its config describes (frames, resolution, audio length and rate: MBT's 8 s of
16 kHz audio, CAV-MAE's single frame and 10 s), so the ratios compare the systems as configured, not the
same token count. One supervised step = forward, the 4 (or 2/3) heads' loss, backward, fused AdamW.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import time

import torch

from zorro.data.info import DatasetInfo
from zorro.models import count_parameters, create_model
from zorro.tasks import SupervisedTask

INPUT_KEYS = ("num_frames", "image_size", "sample_rate", "audio_seconds")


def input_config(model, size: str) -> dict:
    if size == "tiny":  # every tiny variant runs on the tests' inputs
        return dict(num_frames=4, image_size=64, sample_rate=16_000, audio_seconds=1.28)
    params = inspect.signature(type(model).__init__).parameters
    return {k: params[k].default for k in INPUT_KEYS}


def make_batch(cfg: dict, batch: int, device) -> dict:
    samples = round(cfg["audio_seconds"] * cfg["sample_rate"])
    S = cfg["image_size"]
    return {"video": torch.randint(0, 256, (batch, cfg["num_frames"], 3, S, S), dtype=torch.uint8, device=device),
            "audio": (torch.randn(batch, samples, device=device) * 3000).to(torch.int16),
            "label": torch.randint(0, 527, (batch,), device=device)}


def measure(name: str, size: str, batch: int, steps: int, device, dtype, compile_: bool) -> dict:
    model = create_model(f"{name}_{size}")
    cfg = input_config(model, size)
    task = SupervisedTask(backbone=model, dataset=DatasetInfo(num_classes=527, multi_label=False),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-4)).to(device)
    if compile_:
        task.backbone.compile()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = make_batch(cfg, batch, device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = task.compute_loss(data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(name=name, params=count_parameters(model) / 1e6, cfg=cfg, ms=dt * 1e3, clips=batch / dt, mem=mem)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["zorro_vit", "zorro_swin", "zorro_hip", "mbt", "cav_mae"])
    p.add_argument("--size", default=None, choices=["base", "tiny"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("base" if cuda else "tiny")
    batch = args.batch or (32 if cuda else 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{size} backbones, batch {batch}, {str(dtype).split('.')[-1]}, torch {torch.__version__}, {where}"
          f"{', torch.compile' if args.compile else ''}")
    rows = []
    for name in args.models:
        rows.append(measure(name, size, batch, args.steps, device, dtype, args.compile))
        if cuda:
            torch.cuda.empty_cache()
    ref = next((r for r in rows if r["name"] == "zorro_vit"), rows[0])
    print(f"{'model':12}{'params':>9}{'input (T x S^2, audio)':>26}{'ms/step':>10}{'clips/s':>10}{'vs ViT':>8}"
          f"{'peak GiB':>10}")
    for r in rows:
        c = r["cfg"]
        inp = f"{c['num_frames']}x{c['image_size']}^2, {c['audio_seconds']:g}s@{c['sample_rate'] // 1000}k"
        print(f"{r['name']:12}{r['params']:8.1f}M{inp:>26}{r['ms']:10.1f}{r['clips']:10.1f}"
              f"{r['clips'] / ref['clips']:7.2f}x{r['mem']:10.2f}")


if __name__ == "__main__":
    main()
