"""CAV-MAE against the official code (github.com/YuanGongND/cav-mae) on the same weights and inputs.

A child process (the official code needs timm 0.4.5, which this suite's timm >= 1.0 shadows) builds the official
CAVMAE and CAVMAEFT from the checkout's src/models/cav_mae.py, seeds them, perturbs every LayerNorm and bias (a
fresh init has identical LayerNorms and zero biases, which hides misplaced keys) and the fine-tuned model's learned
positions, and saves both as official release files (DataParallel `module.` keys). Its data loader
(src/dataloader.py, AudiosetDataset) reads a few written clips (wav + jpg frames + labels) in eval mode: the
fbank, the frame and the smoothed label vector. It saves every stage of the official forward passes.

This process loads the files the way a user does (`pretrained=`: load_pretrained; `init_from=`: run.init_backbone
with the task's heads) into this suite's models and prints max |ours - official| per stage:
  - frontends: the fbank from the same wav, the normalised frame from the same jpg (float32);
  - float64, from the official loader's tensors: embeddings, the modality blocks, the joint layer (three passes),
    the pooled outputs, the pre-training losses with the same masks (same seed: the same torch.rand draws);
  - float32 through the user's path (waveforms and uint8 frames into the task): the pre-training loss of
    task=cav_mae_pretrain, the fine-tuned model's logits (A+V, and the A / V readings against the official
    missingaudioonly / missingvideoonly modes), the fine-tuning loss of the recipe (task=supervised,
    smoothing=cav_mae) against the official BCE / CE on the official loader's labels;
  - the load reports: official keys neither loaded nor named unused (must be 0).
Augmentations (noise, SpecAugment, mixup) are random on both sides and off here (eval mode).

    python benchmarks/official_equivalence.py --cav-mae /tmp/cav-mae
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# A small CAV-MAE of the official structure (11 modality layers + 1 joint, 128 mel bins) that runs in seconds.
DIM, HEADS, DEC_DIM, DEC_DEPTH, DEC_HEADS = 96, 4, 32, 2, 4
FRAMES, IMAGE, CLIPS, CLASSES, SECONDS = 128, 64, 4, 6, 1.25
TIMM = "/tmp/zorro-timm045"  # timm 0.4.5 (the version the official README asserts), installed with --target


# -- the official side (child process, PYTHONPATH = timm 0.4.5 : <checkout>/src) -----------------------------------
def _perturb(model: torch.nn.Module, generator: torch.Generator, learned_pos: bool) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None, torch.nn.LayerNorm):
                if name.endswith("weight"):
                    p.mul_(1 + torch.randn(p.shape, generator=generator) * 0.2)
            if learned_pos and name in ("pos_embed_a", "pos_embed_v"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _write_clips(root: Path) -> list[dict]:
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * SECONDS)) / 16000
    (root / "frame_5").mkdir(parents=True)
    data = []
    for i in range(CLIPS):
        wav = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.shape)
        soundfile.write(root / f"clip{i}.wav", (wav * 32767).astype(np.int16), 16000, subtype="PCM_16")
        image = rng.integers(0, 256, (IMAGE // 8, IMAGE // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(image).save(root / "frame_5" / f"clip{i}.jpg", quality=95)
        data.append({"wav": str(root / f"clip{i}.wav"), "labels": f"/m/{i % CLASSES}", "video_id": f"clip{i}",
                     "video_path": str(root), "label": i % CLASSES})
    (root / "data.json").write_text(json.dumps({"data": data}))
    (root / "labels.csv").write_text("index,mid,display_name\n" + "".join(f"{c},/m/{c},class {c}\n"
                                                                          for c in range(CLASSES)))
    return data


def official_child(checkout: str, out: str) -> None:
    np.float = float  # the checkout's pos_embed.py uses np.float (the builtin), removed in numpy 1.24
    import soundfile
    import dataloader
    import models

    out = Path(out)
    clips = _write_clips(out / "clips")

    def load_wav(path):  # torchaudio 2.9+ reads files through torchcodec: the same float32 in [-1, 1] via soundfile
        wav, sr = soundfile.read(path, dtype="float32")
        return torch.from_numpy(wav)[None], sr

    dataloader.torchaudio.load = load_wav
    conf = {"num_mel_bins": 128, "target_length": FRAMES, "freqm": 0, "timem": 0, "mixup": 0, "dataset": "audioset",
            "mode": "eval", "mean": -5.081, "std": 4.4849, "noise": False, "label_smooth": 0.1, "im_res": IMAGE}
    loader = dataloader.AudiosetDataset(str(out / "clips" / "data.json"), conf, label_csv=str(out / "clips" / "labels.csv"))
    fbank, image, label = (torch.stack(x) for x in zip(*(loader[i] for i in range(len(clips)))))

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    size = dict(img_size=IMAGE, audio_length=FRAMES, embed_dim=DIM, modality_specific_depth=11, num_heads=HEADS)
    pre = models.CAVMAE(**size, decoder_embed_dim=DEC_DIM, decoder_depth=DEC_DEPTH, decoder_num_heads=DEC_HEADS,
                        norm_pix_loss=True, tr_pos=False)
    _perturb(pre, generator, learned_pos=False)
    ft = models.CAVMAEFT(label_dim=CLASSES, **size, tr_pos=True)
    ft.load_state_dict(pre.state_dict(), strict=False)  # as run_cavmae_ft.py starts from the pre-trained model
    _perturb(ft, generator, learned_pos=True)
    torch.save({f"module.{k}": v for k, v in pre.state_dict().items()}, out / "pretrained.pth")
    torch.save({f"module.{k}": v for k, v in ft.state_dict().items()}, out / "finetuned.pth")

    result = {"fbank": fbank, "image": image, "label": label}
    pre32, ft = copy.deepcopy(pre).eval(), ft.eval()
    pre = pre.double().eval()
    a64, v64 = fbank.double(), image.double()
    with torch.no_grad():
        a = pre.patch_embed_a(a64.unsqueeze(1).transpose(2, 3)) + pre.pos_embed_a + pre.modality_a
        v = pre.patch_embed_v(v64) + pre.pos_embed_v + pre.modality_v
        result.update({"embed audio": a, "embed video": v})
        for blk in pre.blocks_a:
            a = blk(a)
        for blk in pre.blocks_v:
            v = blk(v)
        result.update({"blocks_a": a, "blocks_v": v})
        x, ca, cv = torch.cat([a, v], 1), a, v
        for blk in pre.blocks_u:
            x, ca, cv = blk(x), blk(ca, "a"), blk(cv, "v")
        result.update({"joint [a; v] (norm)": pre.norm(x), "joint audio (norm_a)": pre.norm_a(ca),
                       "joint video (norm_v)": pre.norm_v(cv)})
        feat_a, feat_v = pre.forward_feat(a64, v64)  # the official retrieval embeddings
        result.update({"pooled audio (forward_feat)": feat_a.mean(1), "pooled video (forward_feat)": feat_v.mean(1),
                       "pooled global": pre.norm(x).mean(1)})
        for precision, model, (fa, fv) in (("float64", pre, (a64, v64)), ("float32", pre32, (fbank, image))):
            torch.manual_seed(1)
            loss, _, mae_a, mae_v, loss_c, mask_a, mask_v, c_acc = model(fa, fv, 0.75, 0.75, 1.0, 0.01)
            result[precision] = {"loss": loss, "mae_a": mae_a, "mae_v": mae_v, "loss_c": loss_c, "c_acc": c_acc,
                                 "mask_a": mask_a, "mask_v": mask_v}
        for mode in ("multimodal", "missingaudioonly", "missingvideoonly"):
            result[f"ft {mode}"] = ft(fbank, image, mode)
        logits = result["ft multimodal"]
        result["ft loss BCE"] = torch.nn.BCEWithLogitsLoss()(logits, label)
        result["ft loss CE"] = torch.nn.CrossEntropyLoss()(logits, label)
    torch.save(result, out / "official.pt")
    print(json.dumps({"official_keys_pretrained": len(pre.state_dict()), "official_keys_finetuned": len(ft.state_dict())}))


# -- this suite's side --------------------------------------------------------------------------------------------
def _ours(**kwargs):
    from zorro.models.cav_mae import CAVMAE

    size = dict(dim=DIM, num_heads=HEADS, modality_depth=11, joint_depth=1, decoder_dim=DEC_DIM,
                decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS, image_size=IMAGE, n_mels=128,
                audio_seconds=SECONDS, audio_frames=FRAMES)
    return CAVMAE(**{**size, **kwargs})


def _accounted(report, path: Path) -> int:
    """Official keys that the report neither loaded nor named unused with a reason of the model's (the generic
    "no such tensor" counts as unaccounted)."""
    from zorro.models.pretrained import load_state

    generic = {k for k, why in report.reasons.items() if why.startswith(("no such tensor", "no tensor"))}
    return len(set(load_state(path)) - set(report.sources.values()) - (set(report.unexpected) - generic))


def _max(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def compare(out: Path) -> list[tuple[str, str, float]]:
    import soundfile
    from PIL import Image

    from zorro.data.info import DatasetInfo
    from zorro.run import init_backbone
    from zorro.data.batch import model_inputs
    from zorro.tasks.cav_mae import CAVMAEPretrainTask
    from zorro.tasks.supervised import SupervisedTask

    ref = torch.load(out / "official.pt", weights_only=False)
    clips = json.loads((out / "clips" / "data.json").read_text())["data"]
    wav = torch.stack([torch.from_numpy(soundfile.read(c["wav"], dtype="int16")[0]) for c in clips])
    frames = torch.stack([torch.from_numpy(np.array(Image.open(Path(c["video_path"]) / "frame_5" /
                                                                 f"{c['video_id']}.jpg").convert("RGB")))
                          for c in clips]).permute(0, 3, 1, 2)[:, None]  # B x 1 x 3 x H x W uint8
    label = torch.tensor([c["label"] for c in clips])
    batch = {"audio": wav, "video": frames, "label": label}
    rows: list[tuple[str, str, float]] = []

    def row(stage: str, value: float) -> None:
        rows.append(("CAV-MAE", stage, value))

    for how in ("pretrained=", "init_from="):
        model = _ours()
        report = model.load_pretrained(out / "pretrained.pth") if how == "pretrained=" else \
            init_backbone(model, str(out / "pretrained.pth"))
        row(f"{how} official keys not accounted for ({len(report.loaded)} loaded, {len(report.unexpected)} "
            f"unused)", _accounted(report, out / "pretrained.pth"))
    ft_model = _ours(decoder_depth=0, head="official", trainable_pos=True)
    report = init_backbone(ft_model, str(out / "pretrained.pth"))
    row(f"init_from= pre-trained release, fine-tuning model: keys not accounted for ({len(report.unexpected)} "
        f"unused; missing: {' '.join(sorted({k.split('.')[0] for k in report.missing})) or 'none'})",
        _accounted(report, out / "pretrained.pth"))
    model = model.double().eval()
    with torch.no_grad():
        row("frontend: fbank of the same wav (float32)",
            _max(model.audio_embed.frontend(wav).squeeze(1).transpose(1, 2), ref["fbank"]))
        row("frontend: normalised frame of the same jpg", _max(model.video_embed.frontend(frames)[:, 0], ref["image"]))
        spec = ref["fbank"].double().transpose(1, 2).unsqueeze(1)
        a, _, _ = model.encode_audio(spec)
        v, _, _ = model.encode_video(ref["image"].double())
        row("embed audio (patches + positions + E_a)",
            _max(model.audio_embed.tokens(spec), ref["embed audio"]))
        row("embed video", _max(model.video_embed.tokens(ref["image"].double()), ref["embed video"]))
        row("blocks_a (11 audio layers)", _max(a, ref["blocks_a"]))
        row("blocks_v (11 video layers)", _max(v, ref["blocks_v"]))
        x, ca, cv = model.joint(torch.cat([a, v], 1), "joint"), model.joint(a, "audio"), model.joint(v, "video")
        row("joint layer [a; v] + norm", _max(x, ref["joint [a; v] (norm)"]))
        row("joint layer audio + norm_a", _max(ca, ref["joint audio (norm_a)"]))
        row("joint layer video + norm_v", _max(cv, ref["joint video (norm_v)"]))
        row("pooled audio (retrieval embedding)", _max(ca.mean(1), ref["pooled audio (forward_feat)"]))
        row("pooled video (retrieval embedding)", _max(cv.mean(1), ref["pooled video (forward_feat)"]))
        row("pooled global", _max(x.mean(1), ref["pooled global"]))

        # the pre-training losses with the same masks, float64 from the official loader's tensors
        off = ref["float64"]
        torch.manual_seed(1)
        sa, mask_a, restore_a = model.encode_audio(spec, 0.75)
        sv, mask_v, restore_v = model.encode_video(ref["image"].double(), 0.75)
        xj = model.joint(torch.cat([sa, sv], 1), "joint")
        pred_a, pred_v = model.decode(xj, sa.shape[1], restore_a, restore_v, (IMAGE, IMAGE))
        from zorro.tasks.cav_mae import cav_nce, masked_mse

        ones = torch.ones(len(clips), dtype=torch.bool)
        rec_a = masked_mse(pred_a, model.normalise_patches(model.patchify(spec)), mask_a, ones)
        rec_v = masked_mse(pred_v, model.normalise_patches(model.patchify(ref["image"].double())), mask_v, ones)
        z = [torch.nn.functional.normalize(model.joint(t, s).mean(1), dim=-1) for t, s in ((sa, "audio"), (sv, "video"))]
        nce, acc = cav_nce(z[0].double(), z[1].double(), temperature=0.05)
        row("pre-training masks (same seed)", max(_max(mask_a, off["mask_a"]), _max(mask_v, off["mask_v"])))
        row("pre-training loss L_r audio (float64 model; the task's loss in float32)", _max(rec_a, off["mae_a"]))
        row("pre-training loss L_r video (float64 model; the task's loss in float32)", _max(rec_v, off["mae_v"]))
        row("pre-training loss 0.01 L_c (same)", _max(0.01 * nce, off["loss_c"]))
        row("pre-training contrastive accuracy", _max(acc, off["c_acc"]))

    # the pre-training recipe's loss through the user's path (waveforms, uint8 frames), float32
    task = CAVMAEPretrainTask(backbone=model.float().eval(), optimizer=torch.optim.Adam, contrastive_batch=CLIPS)
    task.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        loss, parts = task.compute_loss(task.device_batch(dict(batch)))
    off = ref["float32"]
    row("task=cav_mae_pretrain loss vs official loss (float32, user path)", _max(loss, off["loss"]))

    # the fine-tuning recipe: head=official, trainable_pos, smoothing=cav_mae; the official fine-tuned release file
    for multi_label, official_loss in ((True, "ft loss BCE"), (False, "ft loss CE")):
        backbone = _ours(decoder_depth=0, head="official", trainable_pos=True)
        ft = SupervisedTask(backbone=backbone, dataset=DatasetInfo(num_classes=CLASSES, multi_label=multi_label),
                            optimizer=torch.optim.Adam, label_smoothing=0.1, smoothing="cav_mae", mixup_alpha=0.0,
                            head_lr_scale=10)
        report = init_backbone(backbone, str(out / "finetuned.pth"), heads=ft.heads)
        ft.eval()
        fbatch = dict(batch, label=torch.nn.functional.one_hot(label, CLASSES).float() if multi_label else label)
        fbatch = ft.device_batch(fbatch)
        with torch.no_grad():
            if multi_label:
                row(f"init_from= fine-tuned release: official keys not accounted for ({len(report.loaded)} loaded)",
                    _accounted(report, out / "finetuned.pth"))
                for inputs, mode in (("audio_video", "multimodal"), ("audio", "missingaudioonly"),
                                     ("video", "missingvideoonly")):
                    logits = ft.heads["global"](ft(fbatch, inputs)["global"])
                    row(f"fine-tuned logits, {inputs} (official {mode}, float32)", _max(logits, ref[f"ft {mode}"]))
                row("smoothed targets vs the official loader's labels", _max(ft.soft_targets(fbatch["label"]),
                                                                              ref["label"]))
            loss, _ = ft.compute_loss(fbatch)
        row(f"fine-tuning loss ({'BCE, multi-label' if multi_label else 'CE, single-label'}) vs official",
            _max(loss, ref[official_loss]))
    return rows


def timm_045(python: str | None) -> tuple[str, dict]:
    """The interpreter and environment that import timm 0.4.5 (installed into TIMM on first use)."""
    env = dict(os.environ)
    if python:
        return python, env
    if not (Path(TIMM) / "timm").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", TIMM, "timm==0.4.5"],
                       check=True)
    env["ZORRO_TIMM045"] = TIMM
    return sys.executable, env


def main(cav_mae_dir: str, python: str | None = None) -> list[tuple[str, str, float]]:
    """Rows (model, stage, max |ours - official|). python: an interpreter whose timm is 0.4.5 (default: this one
    with timm 0.4.5 installed under /tmp/zorro-timm045 put first on its path)."""
    checkout = Path(cav_mae_dir)
    if not (checkout / "src" / "models" / "cav_mae.py").is_file():
        raise SystemExit(f"--cav-mae {checkout}: not a checkout of YuanGongND/cav-mae (no src/models/cav_mae.py)")
    interpreter, env = timm_045(python)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [env.get("ZORRO_TIMM045", ""), str(checkout / "src")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        subprocess.run([interpreter, __file__, "--official-child", str(checkout), "--out", tmp], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return compare(Path(tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cav-mae", help="a checkout of YuanGongND/cav-mae")
    parser.add_argument("--python", help="an interpreter with timm 0.4.5 (default: this one + /tmp/zorro-timm045)")
    args = parser.parse_args()
    if args.official_child:
        official_child(args.official_child, args.out)
    else:
        for model, stage, diff in main(args.cav_mae, args.python):
            print(f"{model:8s} {stage:80s} {diff:.3g}")
