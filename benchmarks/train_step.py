"""Zorro-ViT training-step throughput, peak memory, largest batch and MFU; optionally the data-loading share.

    python benchmarks/train_step.py                       # GPU: ViT-B, 8 x 224^2 frames + 2.56 s of 48 kHz audio, bf16
    python benchmarks/train_step.py --model zorro_vit_tiny --batch 8   # a quick CPU run
    python benchmarks/train_step.py --shards DIR          # + the fraction of step time spent waiting for data
    python benchmarks/train_step.py --compile --profile   # + torch.profiler: top kernels, non-matmul share

MFU = model FLOPs per second / the hardware's peak. Model FLOPs are counted analytically (patch embeddings,
QKV/projection/MLP matmuls, the attention pairs the routing actually computes, the decoder), x3 for
forward + backward. The peak is the GPU's dense bf16 figure (table below, or --peak-tflops); on CPU it is
measured here with a large matmul in the same dtype, so CPU MFU says how close the step runs to this machine's
own matmul speed. Not a test; prints what it measured.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from zorro.data.info import DatasetInfo
from zorro.models import count_parameters, create_model
from zorro.models.routing import Routing, TokenLayout
from zorro.tasks import SupervisedTask

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets (SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def model_flops_per_clip(model, layout: TokenLayout, routing: Routing) -> float:
    """Forward FLOPs for one clip (multiply-add = 2 FLOPs)."""
    D = model.output_dim
    blocks = len(model.blocks)
    hidden = model.blocks[0].mlp.shared.fc1.out_features if not model.blocks[0].mlp.separate else \
        next(iter(model.blocks[0].mlp.parts.values())).fc1.out_features
    n = layout.total
    a_len, f_len, v_len = layout.lengths
    p = model.video_embed.patch_size
    embed = 2 * (a_len * p * p * 1 + v_len * p * p * 3) * D
    pairs = routing.attended_pairs(layout)
    per_block = 2 * n * (4 * D * D + 2 * D * hidden) + 4 * pairs * D
    decoder = 2 * n * 2 * D * D + 2 * 4 * (n * D * 2)
    return embed + blocks * per_block + decoder


def cpu_peak_flops(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def make_batch(model, batch: int, device, num_classes: int):
    T, S = model.video_embed.grid[0], model.video_embed.grid[1] * model.video_embed.patch_size
    samples = int(round(model.audio_embed.grid[1] * model.audio_embed.patch_size * model.audio_embed.frontend.hop))
    return {"video": torch.randint(0, 256, (batch, T, 3, S, S), dtype=torch.uint8, device=device),
            "audio": (torch.randn(batch, samples, device=device) * 3000).to(torch.int16),
            "label": torch.randint(0, num_classes, (batch,), device=device)}


def step_fn(task, optimizer, device, dtype):
    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = task.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


MATMUL = ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "cutlass",
          "xmma", "nvjet", "cublas", "mkldnn_convolution", "aten::convolution", "conv2d", "mkl")
ATTENTION = ("flash", "attention", "flex", "fmha", "sdpa")


def profile_steps(step, data, device, steps: int, top: int = 15) -> None:
    """torch.profiler over `steps` training steps: the top kernels (GPU) / operators (CPU) by self time, and how
    the time splits between matmuls, attention kernels and everything else (the memory-bound work that compile
    fuses: LayerNorm, GELU, casts, copies, the optimizer)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(data)
        sync(device)
    if device.type == "cuda":
        events = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        what = "GPU kernels"
    else:  # CPU: operators' own time (children excluded)
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()
                  if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")]
        what = "CPU operators"
    total = sum(t for _, t, _ in events) or 1.0

    def kind(name: str) -> str:
        low = name.lower()
        if any(k in low for k in ATTENTION):
            return "attention"
        return "matmul" if any(k in low for k in MATMUL) else "other"

    print(f"profile of {steps} steps: top {top} {what} by self time (total {total / 1e3 / steps:.1f} ms/step)")
    print(f"{'share':>7} {'ms/step':>9} {'calls':>6}  kind       name")
    for name, t, count in sorted(events, key=lambda e: -e[1])[:top]:
        print(f"{100 * t / total:6.1f}% {t / 1e3 / steps:9.2f} {count // steps:6d}  {kind(name):10} {name[:90]}")
    shares = {k: sum(t for n, t, _ in events if kind(n) == k) / total for k in ("matmul", "attention", "other")}
    print(f"time share: matmul {100 * shares['matmul']:.1f}%, attention {100 * shares['attention']:.1f}%, "
          f"non-matmul (everything but matmul and attention) {100 * shares['other']:.1f}%")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def largest_batch(build, device, start: int) -> int:
    """Double the batch until the step runs out of memory (CUDA only)."""
    ok, batch = 0, start
    while batch <= 4096:
        try:
            task, opt, step = build()
            step(make_batch(task.backbone, batch, device, 527))
            sync(device)
            ok, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del task, opt, step
            torch.cuda.empty_cache()
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="registered model (default: zorro_vit_base on GPU, _tiny on CPU)")
    p.add_argument("--masking", default="zorro")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attention-backend", default="auto", help="auto | sdpa_slices | flex | dense_mask")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--find-max-batch", action="store_true", help="CUDA: search the largest batch that fits")
    p.add_argument("--shards", default=None, help="feed real batches from these shards and time the data wait")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--decode-on-device", action="store_true", help="with --shards: JPEG frames decoded and augmented "
                   "on the device (data.decode_on_device; counted in the step time)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over a few steps: top kernels, non-matmul share")
    p.add_argument("--profile-steps", type=int, default=3)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = args.model or ("zorro_vit_base" if cuda else "zorro_vit_tiny")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    batch = args.batch or (32 if cuda else 8)
    num_classes = 527  # AudioSet heads

    def build():
        model = create_model(name, masking=args.masking, grad_checkpointing=args.grad_checkpointing,
                             attention_backend=args.attention_backend)
        task = SupervisedTask(backbone=model, dataset=DatasetInfo(num_classes=num_classes, multi_label=False),
                              optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), mixup_alpha=0.0).to(device)
        if args.compile:
            task.backbone.compile()
        opt = torch.optim.AdamW(task.parameters(), lr=1e-4, fused=cuda)
        return task, opt, step_fn(task, opt, device, dtype)

    task, opt, step = build()
    model = task.backbone
    layout = TokenLayout.of(audio=model.audio_embed.pos.shape[1], fusion=model.num_fusion,
                            video=model.video_embed.pos.shape[1])
    flops_clip = 3 * model_flops_per_clip(model, layout, model.routing)
    data = make_batch(model, batch, device, num_classes)
    for _ in range(3):  # warm-up: kernel selection, compilation, allocator
        step(data)
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(data)
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    clips_s = batch / dt
    if cuda:
        gpu = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
            (v * 1e12 for k, v in GPU_PEAK_TFLOPS.items() if k in gpu), None)
        where = f"{gpu} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s)" if peak else gpu
    else:
        peak = cpu_peak_flops(dtype)
        where = f"CPU, {torch.get_num_threads()} threads (measured {dtype} matmul peak {peak / 1e9:.0f} GFLOP/s)"
    backend = model.blocks[0].attn.backend(device, layout, model.routing)
    print(f"{name} ({count_parameters(model) / 1e6:.1f}M params, masking {args.masking}, attention {backend}, "
          f"{'compiled' if args.compile else 'eager'}), {layout.total} tokens/clip, "
          f"batch {batch}, {str(dtype).split('.')[-1]}, torch {torch.__version__}, on {where}")
    print(f"training step: {dt * 1e3:.1f} ms, {clips_s:.2f} clips/s, {flops_clip / 1e9:.1f} GFLOP/clip (fwd+bwd)")
    if peak:
        print(f"MFU: {100 * clips_s * flops_clip / peak:.1f}%")
    if cuda:
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        if args.find_max_batch:
            del task, opt, step, data
            torch.cuda.empty_cache()
            print(f"largest batch that fits: {largest_batch(build, device, batch)}")
            task, opt, step = build()
    if args.profile:
        profile_steps(step, data, device, args.profile_steps)
    if args.shards:
        from zorro.data.device import decode_on_device
        from zorro.data.shards import ShardDataModule

        dm = ShardDataModule(root=args.shards, batch_size=batch, num_workers=args.workers,
                             num_frames=model.video_embed.grid[0],
                             image_size=model.video_embed.grid[1] * model.video_embed.patch_size,
                             sample_rate=model.audio_embed.frontend.sample_rate, pin_memory=cuda, epoch_length=100_000,
                             decode_on_device=args.decode_on_device)
        it, wait, total = iter(dm.train_dataloader()), 0.0, 0.0
        next(it)  # workers up
        for _ in range(args.steps):
            t0 = time.perf_counter()
            b = next(it)
            b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            b["label"] = b["label"] % num_classes
            t1 = time.perf_counter()
            step(decode_on_device(b, device))  # a no-op unless --decode-on-device
            sync(device)
            wait, total = wait + t1 - t0, total + time.perf_counter() - t0
        print(f"with {args.workers} loader workers on {args.shards}: {100 * wait / total:.1f}% of the step time waits "
              f"for data ({batch * args.steps / total:.2f} clips/s end to end)")


if __name__ == "__main__":
    main()
