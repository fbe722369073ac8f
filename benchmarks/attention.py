"""Routed attention vs the same attention with a dense boolean mask, at Zorro-ViT-B token counts.

Both sides share the layer (QKV, output projection) and call `F.scaled_dot_product_attention`; the baseline
passes the N x N boolean mask of the same routing table (a fair baseline: SDPA with a boolean mask, not an
explicit softmax). Prints forward+backward time per layer, the measured ratio, and the FLOP ratio that
bounds it. Not a test.

    python benchmarks/attention.py [--batch 2] [--masking zorro] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from zorro.models.layers import RoutedAttention
from zorro.models.routing import Routing, TokenLayout


def masked_forward(attn: RoutedAttention, x, layout, mask):
    B, N, C = x.shape
    q, k, v = attn.qkv(x, layout).view(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(out.transpose(1, 2).reshape(B, N, C), layout)


def time_fwd_bwd(fn, x, reps: int, device: str) -> float:
    def step():
        x.grad = None
        fn(x).float().square().mean().backward()

    for _ in range(2):  # warm-up (kernel selection, allocator)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # median


def flops(layout: TokenLayout, routing: Routing | None, dim: int, batch: int) -> tuple[float, float]:
    """(attention-core FLOPs, whole-layer FLOPs), forward only (backward is ~2x both, the ratio is the same)."""
    n = layout.total
    if routing is None:
        pairs = n * n
    else:
        pairs = sum((qe - qs) * (ke - ks) for (qs, qe), (ks, ke) in routing.attention_calls(layout))
    core = 2 * 2 * pairs * dim * batch  # QK^T and AV
    linear = 2 * n * dim * 4 * dim * batch  # QKV (3 dim) + output projection (dim)
    return core, core + linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--masking", default="zorro")
    p.add_argument("--audio", type=int, default=128, help="audio tokens (2.56 s, 128 mel bins, 16x16 patches)")
    p.add_argument("--video", type=int, default=1568, help="video tokens (8 x 14 x 14)")
    p.add_argument("--fusion", type=int, default=6)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    args = p.parse_args()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    routing = Routing.from_masking(args.masking)
    layout = TokenLayout.of(audio=args.audio, fusion=args.fusion if routing.has_fusion else 0, video=args.video)
    torch.manual_seed(0)
    attn = RoutedAttention(dim=args.dim, num_heads=args.heads).to(args.device, dtype)
    x = torch.randn(args.batch, layout.total, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    mask = routing.dense_mask(layout).to(args.device)

    with torch.no_grad():  # same function, two implementations
        diff = (attn(x, layout, routing).float() - masked_forward(attn, x, layout, mask).float()).abs().max().item()
    t_routed = time_fwd_bwd(lambda t: attn(t, layout, routing), x, args.reps, args.device)
    t_dense = time_fwd_bwd(lambda t: masked_forward(attn, t, layout, mask), x, args.reps, args.device)
    # The attention core alone (SDPA calls on given q, k, v): the part the routing changes.
    calls = routing.attention_calls(layout)
    qkv = torch.randn(3, args.batch, args.heads, layout.total, args.dim // args.heads, device=args.device,
                      dtype=dtype, requires_grad=True)

    def routed_core(t):
        q, k, v = t
        return torch.cat([F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke])
                          for (qs, qe), (ks, ke) in calls], dim=2)

    def dense_core(t):
        return F.scaled_dot_product_attention(t[0], t[1], t[2], attn_mask=mask)

    c_routed = time_fwd_bwd(routed_core, qkv, args.reps, args.device)
    c_dense = time_fwd_bwd(dense_core, qkv, args.reps, args.device)
    core_r, layer_r = flops(layout, routing, args.dim, args.batch)
    core_d, layer_d = flops(layout, None, args.dim, args.batch)

    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, dtype {args.dtype}, batch {args.batch}, masking {args.masking}")
    print(f"tokens: audio {args.audio} + fusion {layout.lengths[1]} + video {args.video} = {layout.total}, "
          f"dim {args.dim}, heads {args.heads}; max |routed - dense| = {diff:.2e}")
    print(f"{'fwd+bwd ms':24}{'dense mask':>12}{'routed':>12}{'speed-up':>10}{'FLOP limit':>12}")
    print(f"{'attention core (SDPA)':24}{c_dense * 1e3:12.1f}{c_routed * 1e3:12.1f}{c_dense / c_routed:9.2f}x"
          f"{core_d / core_r:11.3f}x")
    print(f"{'whole layer (+QKV/proj)':24}{t_dense * 1e3:12.1f}{t_routed * 1e3:12.1f}{t_dense / t_routed:9.2f}x"
          f"{layer_d / layer_r:11.3f}x")
    if args.device == "cuda":
        # Which fused kernel each side can use: the routed slices need no mask, so flash attention applies;
        # flash takes no arbitrary mask, so the dense baseline falls back to the memory-efficient kernel.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, fn, arg in (("routed", routed_core, qkv), ("dense mask", dense_core, qkv)):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel(backend), torch.no_grad():
                        fn(arg)
                    ok = "eligible"
                except RuntimeError:
                    ok = "not eligible"
                print(f"{label:>10}: {backend.name} {ok}")
        peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
        key = next((k for k in peak if k in name), None)
        if key and args.dtype == "bf16":
            achieved = 3 * layer_r / t_routed  # fwd + bwd ~ 3x forward FLOPs
            print(f"routed layer MFU: {100 * achieved / peak[key]:.1f}% of {key} dense bf16 peak")


if __name__ == "__main__":
    main()
