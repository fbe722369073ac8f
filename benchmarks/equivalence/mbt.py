"""Our MBT against scenic's (google-research/scenic, scenic/projects/mbt, the code MBT's paper trained with) on the
same weights and inputs: every layer's tokens, the bottleneck tokens, the normalised CLS tokens, the evaluation
logits and the recipe's training loss.

    python benchmarks/equivalence/mbt.py --scenic /tmp/scenic --python /tmp/scenic_venv/bin/python

`--scenic` is a checkout holding the `scenic` package (`git archive HEAD scenic | tar -x`); `--python` a Python with
jax, flax, ml_collections, immutabledict, scipy (no tensorflow needed: scenic_mbt_side.py). The weights are loaded
the way each side's user loads them: ours through `MBT.load_pretrained` from a timm ViT file, scenic's through its
`initialise_from_train_state` from the same ViT in scenic's parameter tree. The ViT is seeded and every LayerNorm
and bias is perturbed (a fresh init has identical LayerNorms and zero biases, which would hide a misplaced key).
Two things are not loaded on either side and are copied from ours into scenic's: the bottleneck tokens (the paper's
N(0, 0.02); scenic overwrites them with the resized ViT positions, reported as `scenic bottleneck init`) and the new
classifier (scenic's starts at zeros). Our side runs in float32, scenic's in float64.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SIDE = Path(__file__).with_name("scenic_mbt_side.py")
SIZE = dict(dim=64, depth=3, num_heads=4, fusion_layer=1, num_bottleneck=4, drop_path_rate=0.0, num_frames=2,
            image_size=32, sample_rate=16_000, n_mels=32, audio_seconds=0.64, spec_augment=False)
CLASSES, BATCH = 7, 2


def perturbed_vit(seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm ViT (the MBT streams' width, 224^2 positions) with every LayerNorm and bias moved off its init."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=SIZE["dim"], depth=SIZE["depth"],
                            num_heads=SIZE["num_heads"], num_classes=0)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    for key, value in state.items():
        if "norm" in key and key.endswith("weight"):
            value += 0.3 * torch.randn_like(value)
        elif key.endswith("bias"):
            value += 0.3 * torch.randn_like(value)
    state["cls_token"] += 0.5 * torch.randn_like(state["cls_token"])
    state["pos_embed"] += 0.5 * torch.randn_like(state["pos_embed"])
    return state


def vit_as_scenic_tree(state: dict[str, torch.Tensor], heads: int) -> dict[str, np.ndarray]:
    """A timm ViT state dict in scenic's ViT parameter tree (flattened with '/')."""
    d = state["cls_token"].shape[-1]
    hd = d // heads
    a = lambda t: t.detach().double().numpy()  # noqa: E731
    out = {"embedding/kernel": a(state["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
           "embedding/bias": a(state["patch_embed.proj.bias"]), "cls": a(state["cls_token"]),
           "Transformer/posembed_input/pos_embedding": a(state["pos_embed"]),
           "Transformer/encoder_norm/scale": a(state["norm.weight"]),
           "Transformer/encoder_norm/bias": a(state["norm.bias"])}
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, s = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            kernel = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
            out[f"{s}MultiHeadDotProductAttention_0/{name}/kernel"] = a(kernel)
            out[f"{s}MultiHeadDotProductAttention_0/{name}/bias"] = a(qkv_b[j * d:(j + 1) * d].reshape(heads, hd))
        out[f"{s}MultiHeadDotProductAttention_0/out/kernel"] = a(state[b + "attn.proj.weight"].T.reshape(heads, hd, d))
        out[f"{s}MultiHeadDotProductAttention_0/out/bias"] = a(state[b + "attn.proj.bias"])
        for k, norm in enumerate(("norm1", "norm2")):
            out[f"{s}LayerNorm_{k}/scale"], out[f"{s}LayerNorm_{k}/bias"] = a(state[b + f"{norm}.weight"]), a(
                state[b + f"{norm}.bias"])
        for k, fc in enumerate(("fc1", "fc2")):
            out[f"{s}MlpBlock_0/Dense_{k}/kernel"] = a(state[b + f"mlp.{fc}.weight"].T)
            out[f"{s}MlpBlock_0/Dense_{k}/bias"] = a(state[b + f"mlp.{fc}.bias"])
        i += 1
    return {f"vit/{k}": v for k, v in out.items()}


def main(scenic_dir: str, python: str | None = None) -> list[tuple[str, str, float]]:
    """(model, stage, max |ours - scenic's|) rows."""
    from zorro.data.info import DatasetInfo
    from zorro.models.mbt import MBT
    from zorro.tasks import SupervisedTask

    vit = perturbed_vit()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(vit, tmp / "vit.pth")
        torch.manual_seed(1)
        model = MBT(**SIZE)
        report = model.load_pretrained(tmp / "vit.pth")  # the user's path: pretrained=<file>
        assert report.missing == ["bottleneck"] and not report.mismatched, report
        task = SupervisedTask(backbone=model, dataset=DatasetInfo(num_classes=CLASSES, multi_label=True),
                              optimizer=None, shared_head=True, combine="logits", loss_reduction="sum_classes",
                              view_average="logits", mixup_alpha=0.0, label_smoothing=0.0).eval()
        with torch.no_grad():
            task.heads["audio"].weight.normal_(0, 0.5)
            task.heads["audio"].bias.normal_(0, 0.5)
        g = torch.Generator().manual_seed(2)
        audio = (torch.randn(BATCH, round(SIZE["audio_seconds"] * SIZE["sample_rate"]), generator=g) * 0.1)
        video = torch.randint(0, 256, (BATCH, SIZE["num_frames"], 3, SIZE["image_size"], SIZE["image_size"]),
                              generator=g, dtype=torch.uint8)
        label = (torch.rand(BATCH, CLASSES, generator=g) < 0.4).float()
        layers = {}
        for i, (ba, bv) in enumerate(zip(model.audio.blocks, model.video.blocks)):
            ba.register_forward_hook(lambda m, a, o, i=i: layers.__setitem__((i, "audio"), o))
            bv.register_forward_hook(lambda m, a, o, i=i: layers.__setitem__((i, "video"), o))
        batch = {"audio": audio, "video": video, "label": label}
        with torch.no_grad():
            outputs = task(batch)
            logits = task.predict_scores(batch, outputs=outputs)["avg"]
            loss, _ = task.compute_loss(batch)
            spec = model.audio_embed.frontend(audio)  # B x 1 x mel x time
            frames = model.video_embed.frontend(video)  # B x T x 3 x H x W, in [-1, 1]
        data = {"spectrogram": spec[:, 0].transpose(1, 2)[..., None].repeat(1, 1, 1, 3).double().numpy(),
                "rgb": frames.permute(0, 1, 3, 4, 2).double().numpy(), "label": label.double().numpy(),
                "bottleneck": model.bottleneck.detach().double().numpy(),
                "head_kernel": task.heads["audio"].weight.detach().T.double().numpy(),
                "head_bias": task.heads["audio"].bias.detach().double().numpy(),
                **vit_as_scenic_tree(vit, SIZE["num_heads"]),
                **{k: np.array(SIZE[k]) for k in ("dim", "depth", "fusion_layer", "num_bottleneck", "num_frames")},
                "heads": np.array(SIZE["num_heads"]), "num_classes": np.array(CLASSES)}
        np.savez(tmp / "in.npz", **data)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([python or sys.executable, str(SIDE), "--scenic", str(scenic_dir), "--inputs",
                               str(tmp / "in.npz"), "--outputs", str(tmp / "out.npz")], capture_output=True, text=True,
                              env=env, timeout=1200)
        if proc.returncode:
            raise RuntimeError(f"scenic's side failed:\n{proc.stderr[-4000:]}")
        ref = dict(np.load(tmp / "out.npz"))

    freq, time = model.audio_embed.grid
    n_a = 1 + freq * time

    def scenic_order(tokens: torch.Tensor) -> np.ndarray:
        """Our audio tokens [CLS, (mel, time) patches] in scenic's order [CLS, (time, mel) patches]."""
        cls, patches = tokens[:, :1], tokens[:, 1:n_a]
        patches = patches.reshape(BATCH, freq, time, -1).transpose(1, 2).reshape(BATCH, freq * time, -1)
        return torch.cat([cls, patches], 1).double().numpy()

    diff = lambda ours, theirs: float(np.abs(np.asarray(ours, np.float64) - theirs).max())  # noqa: E731
    rows = []
    for i in range(SIZE["depth"]):
        ya, yv = layers[i, "audio"], layers[i, "video"]
        rows.append(("mbt", f"layer {i} audio tokens", diff(scenic_order(ya), ref[f"layer{i}/audio"])))
        n_v = ref[f"layer{i}/video"].shape[1]
        rows.append(("mbt", f"layer {i} video tokens", diff(yv[:, :n_v].double().numpy(), ref[f"layer{i}/video"])))
        if i >= SIZE["fusion_layer"]:
            z = ((ya[:, n_a:] + yv[:, n_v:]) / 2).double().numpy()
            rows.append(("mbt", f"layer {i} bottleneck", diff(z, ref[f"layer{i}/bottleneck"])))
    rows.append(("mbt", "CLS audio (final norm)", diff(outputs["audio"].double().numpy(), ref["cls/audio"])))
    rows.append(("mbt", "CLS video (final norm)", diff(outputs["video"].double().numpy(), ref["cls/video"])))
    rows.append(("mbt", "logits (CLS logits averaged)", diff(logits.double().numpy(), ref["logits"])))
    rows.append(("mbt", "training loss (sum over classes, CLS losses averaged)",
                 diff(loss.double().numpy(), ref["loss"])))
    rows.append(("mbt", "scenic bottleneck init vs ours (not compared: the paper's)",
                 diff(model.bottleneck.detach().double().numpy(), ref["scenic_bottleneck_init"])))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenic", required=True, help="a checkout holding the scenic package")
    p.add_argument("--python", default=None, help="a Python with jax and flax (default: this one)")
    args = p.parse_args()
    for model_name, stage, value in main(args.scenic, args.python):
        print(f"{model_name:5s} {stage:60s} {value:.3g}")
