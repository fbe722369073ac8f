"""A-only / V-only evaluation with the absent stream dropped vs the paper's zero-filled input (issue 12.4).

    python benchmarks/unimodal_eval.py                  # Zorro-ViT-B shapes (128 audio + 6 fusion + 1568 video tokens)
    python benchmarks/unimodal_eval.py --size tiny      # quick check

Under zorro / two_streams the audio head never reads video, so the A-only setting can run the audio stream
alone (`task.unimodal_eval=auto`): exactly the zero-filled value of that head, with 128 instead of 1702 tokens.
Prints the measured speed-up of one evaluation forward pass per setting next to the FLOP ratio (computed from
the token counts and the model's widths, not hard-coded), and checks that the two give the same audio output.
"""

from __future__ import annotations

import argparse
import time

import torch

from zorro.models import create_model


def transformer_flops(tokens: int, *, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `depth` pre-norm ViT blocks on `tokens` tokens attending to all of them (2 per MAC)."""
    per_layer = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim) + 2 * 2 * tokens * tokens * dim
    return depth * per_layer


def zorro_layer_flops(audio: int, fusion: int, video: int, *, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """The same blocks under the zorro routing: audio reads audio, video reads video, fusion reads everything."""
    n = audio + fusion + video
    dense = 2 * n * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    attn = 2 * 2 * dim * (audio * audio + video * video + fusion * n)
    return depth * (dense + attn)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base", choices=["base", "tiny"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(f"zorro_vit_{args.size}", masking="zorro").to(device).eval()
    T, (h, w) = model.video_embed.grid[0], model.video_embed.grid[1:]
    frames = torch.randint(0, 256, (args.batch, T, 3, h * model.video_embed.patch_size, w * model.video_embed.patch_size), dtype=torch.uint8, device=device)
    samples = model.audio_embed.grid[1] * model.audio_embed.patch_size * model.audio_embed.frontend.hop  # configured
    audio = (torch.randn(args.batch, samples, device=device) * 3000).to(torch.int16)
    none = torch.zeros(args.batch, dtype=torch.bool, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def zero_filled():  # the paper's A-only input: video zeroed, every stream runs
        return model(audio, frames, has_video=none)

    def dropped():  # the audio stream alone
        return model(audio, None, drop_absent=True)

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        same = torch.allclose(zero_filled()["audio"].float(), dropped()["audio"].float(), atol=1e-4, rtol=1e-3)
        t_zero, t_drop = timed(zero_filled, args.repeats), timed(dropped, args.repeats)
    a, v = (int(torch.tensor(g).prod()) for g in (model.audio_embed.grid, model.video_embed.grid))
    dim, depth = model.output_dim, len(model.blocks)
    flops_zero = zorro_layer_flops(a, model.num_fusion, v, dim=dim, depth=depth)
    flops_drop = zorro_layer_flops(a, model.num_fusion, 0, dim=dim, depth=depth)
    print(f"Zorro-ViT-{args.size} ({a} audio + {model.num_fusion} fusion + {v} video tokens), batch {args.batch}, "
          f"{device.type} {str(dtype).split('.')[-1]}")
    print(f"A-only, zero-filled video: {1000 * t_zero:.1f} ms; video stream dropped: {1000 * t_drop:.1f} ms")
    print(f"audio output identical: {same}")
    print(f"A-only evaluation speed-up: {t_zero / t_drop:.1f}x (tokens {(a + model.num_fusion + v) / (a + model.num_fusion):.1f}x, "
          f"block FLOPs {flops_zero / flops_drop:.1f}x)")


if __name__ == "__main__":
    main()
