"""Routed attention vs the same attention with a dense boolean mask, at Zorro-ViT-B token counts, per backend.

The baseline is the masked layer: the same QKV / output projection and one `F.scaled_dot_product_attention`
call with the N x N boolean mask of the routing table (a fair baseline: SDPA with a boolean mask, not an explicit
softmax; it is RoutedAttention's `dense_mask` backend). Every other backend available on the device is timed
against it, forward + backward (the variants run in turn; median of the paired ratios), as the whole layer and
as the attention core alone (given q, k, v), next to the FLOP limits the routing allows (computed from the token
counts). The measured code is the model's own (`RoutedAttention`, `layers.routed_attention`). Not a test.

    python benchmarks/attention.py                         # CUDA: bf16, batch 8; CPU: fp32 then bf16
    python benchmarks/attention.py --batch 2 --dtype fp32 --masking bottleneck
    python benchmarks/attention.py --mode forward          # inference: forward only

torch's FlexAttention has no backward on CPU, so on CPU the flex rows are forward-only and opt-in
(`--cpu-flex`: compiling it takes ~1 min on a small CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from zorro.models.layers import ATTENTION_BACKENDS, RoutedAttention, flex_block_mask, routed_attention
from zorro.models.routing import Routing, TokenLayout

BASELINE = "dense_mask"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_times(fns: dict, reps: int, device: str, warmup: int = 2) -> dict:
    """{name: (median s, median of the paired ratios first-fn time / this time)}. The functions run in turn, so a
    load that drifts (a shared machine) slows them alike and the ratios stay honest."""
    for _ in range(warmup):  # kernel selection, compilation, allocator
        for fn in fns.values():
            fn()
    sync(device)
    runs = [{name: timed(fn, device) for name, fn in fns.items()} for _ in range(reps)]
    base = next(iter(fns))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {name: (median([r[name] for r in runs]), median([r[base] / r[name] for r in runs])) for name in fns}


def fwd_bwd(fn, inp):
    def step():
        inp.grad = None
        fn(inp).float().square().mean().backward()

    return step


def fwd_only(fn, inp):
    inp = inp.detach()  # FlexAttention on CPU refuses inputs that require grad, even under no_grad

    def step():
        with torch.no_grad():
            fn(inp)

    return step


def flops(layout: TokenLayout, routing: Routing | None, dim: int, batch: int) -> tuple[float, float]:
    """(attention-core FLOPs, whole-layer FLOPs), forward only (backward is ~2x both, the ratio is the same)."""
    n = layout.total
    pairs = n * n if routing is None else routing.attended_pairs(layout)
    core = 2 * 2 * pairs * dim * batch  # QK^T and AV
    linear = 2 * n * dim * 4 * dim * batch  # QKV (3 dim) + output projection (dim)
    return core, core + linear


def previous_layer(attn: RoutedAttention, x, layout, routing):
    """The layer before this change (per-group SDPA on slices, then torch.cat and a transposed copy), for the record."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x, layout).view(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    outs = [torch.nn.functional.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke])
            for (qs, qe), (ks, ke) in routing.attention_calls(layout)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return attn.proj(out.transpose(1, 2).reshape(B, N, C), layout)


def run(args, dtype_name: str) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = args.device
    routing = Routing.from_masking(args.masking)
    layout = TokenLayout.of(audio=args.audio, fusion=args.fusion if routing.has_fusion else 0, video=args.video)
    backends = [b for b in ATTENTION_BACKENDS if b != "auto"]
    if not routing.is_contiguous(layout):
        backends.remove("sdpa_slices")
    torch.manual_seed(0)
    layers = {b: RoutedAttention(dim=args.dim, num_heads=args.heads, attention_backend=b).to(device, dtype)
              for b in backends}
    for b in backends:  # the same weights everywhere: the outputs must agree
        layers[b].load_state_dict(layers[BASELINE].state_dict())
    x = torch.randn(args.batch, layout.total, args.dim, device=device, dtype=dtype, requires_grad=True)
    qkv = torch.randn(3, args.batch, args.heads, layout.total, args.dim // args.heads, device=device, dtype=dtype,
                      requires_grad=True)
    trains = {b: device != "cpu" or b != "flex" for b in backends}  # torch: no FlexAttention backward on CPU
    if device == "cpu" and not args.cpu_flex:
        backends.remove("flex")

    def layer_fn(b):
        return lambda t: layers[b](t, layout, routing)

    def core_fn(b):
        if b == "flex" and device == "cpu":  # the model runs CPU flex eagerly (tests); time torch's compiled kernel
            from torch.nn.attention.flex_attention import flex_attention

            mask, fa = flex_block_mask(routing, layout, device), torch.compile(flex_attention, dynamic=False)
            return lambda t: fa(t[0], t[1], t[2], block_mask=mask).transpose(1, 2)
        return lambda t: routed_attention(t[0], t[1], t[2], layout, routing, backend=b)

    core_r, layer_r = flops(layout, routing, args.dim, args.batch)
    core_d, layer_d = flops(layout, None, args.dim, args.batch)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, dtype {dtype_name}, batch {args.batch}, masking {args.masking}, "
          f"median of {args.reps}")
    print(f"tokens: audio {args.audio} + fusion {layout.lengths[1]} + video {args.video} = {layout.total}, "
          f"dim {args.dim}, heads {args.heads}; FLOP limits (dense pairs / routed pairs): "
          f"core {core_d / core_r:.3f}x, layer {layer_d / layer_r:.3f}x")
    with torch.no_grad():
        ref = layers[BASELINE](x, layout, routing).float()
        for b in backends:
            if b != BASELINE and not (b == "flex" and device == "cpu"):
                diff = (layers[b](x, layout, routing).float() - ref).abs().max().item()
                print(f"  max |{b} - {BASELINE}| = {diff:.2e}")

    rows = []  # (what, backend, baseline s, routed s, median paired speed-up, FLOP limit)
    for mode in ("fwd+bwd", "fwd"):
        if mode == "fwd+bwd" and args.mode == "forward":
            continue
        todo = [b for b in backends if (trains[b] if mode == "fwd+bwd" else args.mode != "train" or not trains[b])]
        if not todo:
            continue
        make = fwd_bwd if mode == "fwd+bwd" else fwd_only
        layer = {b: make(layer_fn(b), x) for b in [BASELINE, *todo] if not (b == "flex" and device == "cpu")}
        if mode == "fwd+bwd" and "sdpa_slices" in todo and not args.skip_before:
            layer["slices+cat (before)"] = make(lambda t: previous_layer(layers[BASELINE], t, layout, routing), x)
        core = {b: make(core_fn(b), qkv) for b in [BASELINE, *todo]}
        for what, fns, limit in ((f"whole layer, {mode}", layer, layer_d / layer_r),
                                 (f"attention core, {mode}", core, core_d / core_r)):
            if len(fns) < 2:
                continue
            times = interleaved_times(fns, args.reps, device)
            for b, (t, ratio) in times.items():
                if b != BASELINE:
                    rows.append((what, b, times[BASELINE][0], t, ratio, limit))
    rows.sort(key=lambda r: (r[0], r[1]))
    print(f"{'ms (median)':24}{'backend':>20}{'masked':>10}{'routed':>10}{'speed-up':>10}{'FLOP limit':>12}")
    for what, b, base, t, ratio, limit in rows:
        print(f"{what:24}{b:>20}{base * 1e3:10.1f}{t * 1e3:10.1f}{ratio:9.2f}x{limit:11.3f}x")
    if device == "cuda":
        peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
        key = next((k for k in peak if k in name), None)
        best = min((r for r in rows if r[0] == "whole layer, fwd+bwd"), key=lambda r: r[3], default=None)
        if key and dtype_name == "bf16" and best:
            print(f"fastest routed layer ({best[1]}) MFU: {100 * 3 * layer_r / best[3] / peak[key]:.1f}% of {key} "
                  f"dense bf16 peak")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--masking", default="zorro")
    p.add_argument("--audio", type=int, default=128, help="audio tokens (2.56 s, 128 mel bins, 16x16 patches)")
    p.add_argument("--video", type=int, default=1568, help="video tokens (8 x 14 x 14)")
    p.add_argument("--fusion", type=int, default=6)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="comma-separated: fp32,bf16 (default: bf16 on CUDA, both on CPU)")
    p.add_argument("--mode", default="train", choices=["train", "forward", "both"],
                   help="time forward + backward (train), forward only (inference), or both")
    p.add_argument("--skip-before", action="store_true", help="skip the previous slices+cat layer row")
    p.add_argument("--cpu-flex", action="store_true", help="CPU: also time FlexAttention (forward only, compiled)")
    args = p.parse_args()
    for i, dtype in enumerate((args.dtype or ("bf16" if args.device == "cuda" else "fp32,bf16")).split(",")):
        if i:
            print()
        run(args, dtype)


if __name__ == "__main__":
    main()
