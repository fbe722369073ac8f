"""What is specific to CAV-MAE (the registry tests in test_backbones.py cover outputs, gradients, information flow,
other frame sizes, checkpointing and no_weight_decay): the paper's parameter counts, frame averaging, the masking
modes, MAE targets, the official fbank, and loading image MAE / CAV-MAE weights."""

import re

import pytest
import timm
import torch
import torchaudio

from zorro.data.info import DatasetInfo
from zorro.models import cav_mae_base, cav_mae_tiny, count_parameters
from zorro.models.cav_mae import KaldiFbank, random_masking
from zorro.run import init_backbone
from zorro.tasks.supervised import SupervisedTask

from .helpers import inputs

# Paper (section 2.3.1): encoder ~164M, decoder ~27M. Ours, counted (the official code also counts its frozen
# sin-cos position tables as parameters, +0.54M encoder and +0.36M decoder; here they are buffers):
BASE_ENCODER, BASE_DECODER = 163.82e6, 26.14e6


def _is_decoder(name: str) -> bool:
    return name.startswith(("decoder", "mask_token"))


def test_base_parameter_count(no_random_init):
    model = cav_mae_base()
    encoder = sum(p.numel() for n, p in model.named_parameters() if not _is_decoder(n))
    assert encoder == pytest.approx(BASE_ENCODER, rel=1e-3)
    assert count_parameters(model) - encoder == pytest.approx(BASE_DECODER, rel=1e-3)
    assert (len(model.blocks_a), len(model.blocks_v), len(model.blocks_u), len(model.decoder_blocks)) == (11, 11, 1, 8)
    assert model.audio_embed.grid == (8, 64) and model.video_embed.grid == (14, 14)  # 512 audio and 196 video patches


def test_encoder_only_variant_drops_the_decoder():
    model = cav_mae_tiny(decoder_depth=0)
    assert not any(_is_decoder(n) for n, _ in model.named_parameters())
    audio, video = inputs()
    with pytest.raises(RuntimeError, match="without a decoder"):
        model.pretrain_forward(audio, video)


def test_frames_are_encoded_one_by_one_and_averaged():
    """With T frames per clip, each frame is its own pass and the video and joint outputs are averaged over them."""
    torch.manual_seed(0)
    model = cav_mae_tiny().eval()
    audio, video = inputs()
    with torch.no_grad():
        out = model(audio=audio, video=video)
        per_frame = [model(audio=audio, video=video[:, t : t + 1]) for t in range(video.shape[1])]
    torch.testing.assert_close(out["audio"], per_frame[0]["audio"])
    for name in ("video", "global"):
        torch.testing.assert_close(out[name], torch.stack([o[name] for o in per_frame]).mean(0))
        assert not torch.allclose(per_frame[0][name], per_frame[1][name])  # the frames differ: not vacuous


@pytest.mark.parametrize("mask_mode", ["random", "time", "freq", "tf"])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_masking_keeps_exactly_the_unmasked_share(mask_mode, ratio):
    torch.manual_seed(0)
    model = cav_mae_tiny()
    audio, video = inputs()
    out = model.pretrain_forward(audio, video, mask_ratio=ratio, mask_mode=mask_mode)
    for name, grid in (("audio", model.audio_embed.grid), ("video", model.video_embed.grid)):
        L = grid[0] * grid[1]
        mask = out[f"{name}_mask"]
        assert mask.shape == (2, L) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum(1) == L - int(L * (1 - ratio))).all()  # exactly int(L * (1 - ratio)) tokens kept
        assert out[f"{name}_pred"].shape == out[f"{name}_target"].shape == out[f"{name}_patches"].shape
    if mask_mode != "random":  # whole time columns / frequency rows of the (F x T) patch grid are hidden
        f, t = model.audio_embed.grid
        grid = out["audio_mask"].view(2, f, t).bool()
        cols, rows = grid.all(1).sum(1), grid.all(2).sum(1)
        scale = 0.7 if mask_mode == "tf" else 1.0
        if mask_mode in ("time", "tf"):
            assert (cols >= int(t * ratio * scale)).all()
        if mask_mode in ("freq", "tf"):
            assert (rows >= int(f * ratio * scale)).all()


def test_random_masking_gathers_the_kept_tokens():
    x = torch.arange(2 * 8, dtype=torch.float).view(2, 8, 1)
    kept, mask, restore = random_masking(x, 0.75)
    assert kept.shape == (2, 2, 1)
    for b in range(2):
        assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, mask[b] == 0, 0].tolist())
    unshuffled = torch.cat([kept, torch.full((2, 6, 1), -1.0)], 1).gather(1, restore[..., None])
    torch.testing.assert_close(unshuffled[mask == 0], x[mask == 0])


def test_targets_are_normalised_patches_and_unpatchify_inverts_patchify():
    model = cav_mae_tiny()
    image = torch.randn(2, 3, 64, 64)
    patches = model.patchify(image)
    assert patches.shape == (2, 16, 16 * 16 * 3)
    torch.testing.assert_close(model.unpatchify(patches, (4, 4)), image)
    target = model.normalise_patches(patches)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_batched_kaldi_fbank_equals_torchaudio():
    """The official preprocessing (torchaudio's kaldi fbank, one clip per call), zero-padded, normalised."""
    torch.manual_seed(0)
    wav = (torch.randn(2, 16000 * 3) * 3000).to(torch.int16)  # 3 s: 298 frames, zero-padded to 400
    spec = KaldiFbank(frames=400)(wav)
    assert spec.shape == (2, 1, 128, 400)
    for i in range(2):
        w = wav[i : i + 1].float() / 32768
        ref = torchaudio.compliance.kaldi.fbank(w - w.mean(), htk_compat=True, sample_frequency=16000,
                                                use_energy=False, window_type="hanning", num_mel_bins=128,
                                                dither=0.0, frame_shift=10)
        assert ref.shape == (298, 128)
        torch.testing.assert_close(spec[i, 0, :, :298], ((ref - (-5.081)) / 4.4849).T)
        torch.testing.assert_close(spec[i, 0, :, 298:], torch.full((128, 102), 5.081 / 4.4849))


def test_load_pretrained_from_an_image_vit(tmp_path):
    """A tiny timm ViT (and MAE decoder keys) saved to a file: 12 layers -> 2 + 2 modality layers and 1 joint."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=3, num_heads=4,
                            img_size=64, num_classes=0)
    state = vit.state_dict()
    state["decoder_pred.weight"], state["decoder_pred.bias"] = torch.randn(16 * 16 * 3, 32), torch.randn(16 * 16 * 3)
    torch.save({"model": state}, tmp_path / "mae.pth")
    model = cav_mae_tiny()
    report = model.load_pretrained(tmp_path / "mae.pth")
    for i in range(2):
        for stream in (model.blocks_a, model.blocks_v):
            torch.testing.assert_close(stream[i].attn.qkv.weight, state[f"blocks.{i}.attn.qkv.weight"])
    joint = model.blocks_u[0]
    torch.testing.assert_close(joint.mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"])
    for norm in (joint.norm1, joint.norm1_a, joint.norm1_v):
        torch.testing.assert_close(norm.weight, state["blocks.2.norm1.weight"])
    for norm in (model.norm, model.norm_a, model.norm_v):
        torch.testing.assert_close(norm.bias, state["norm.bias"])
    torch.testing.assert_close(model.video_embed.patch.proj.weight, state["patch_embed.proj.weight"])
    torch.testing.assert_close(model.audio_embed.patch.proj.weight,
                               state["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.decoder_pred_a.weight, state["decoder_pred.weight"][:256])
    torch.testing.assert_close(model.decoder_pred_v.weight, state["decoder_pred.weight"])
    assert {"cls_token", "pos_embed"} <= set(report.unexpected) and not report.mismatched
    assert "audio_embed.type_embed" in report.missing and "decoder_blocks.0.attn.qkv.weight" in report.missing


# -- official CAV-MAE files (github.com/yuangongnd/cav-mae): layout, and a reference forward from their tensors ----
def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every LayerNorm and bias (and learned position) different: a fresh init has identical norms and zero biases,
    under which a norm loaded into the wrong place goes unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", ".pos")) or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# this suite's names -> the official code's (its CAVMAE / CAVMAEFT modules)
OFFICIAL = {"head_norm.": "mlp_head.0.", "audio_embed.patch.": "patch_embed_a.", "video_embed.patch.": "patch_embed_v.",
            "audio_embed.pos": "pos_embed_a", "video_embed.pos": "pos_embed_v", "audio_embed.type_embed": "modality_a",
            "video_embed.type_embed": "modality_v"}


def official_file(model, path, head: torch.nn.Linear | None = None) -> dict:
    """Save `model` as the official code does: its names (OFFICIAL), DataParallel `module.` keys, the sin-cos tables
    saved as parameters, the fine-tuning head as `mlp_head` (LayerNorm + Linear)."""
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in OFFICIAL.items():
            key = theirs + key[len(ours):] if key.startswith(ours) else key
        state[key] = value
    tables = {"pos_embed_a": model.audio_embed.pos, "pos_embed_v": model.video_embed.pos,
              **{n: b for n, b in model.named_buffers() if n.startswith("decoder_pos_embed")}}
    for name, table in tables.items():
        state.setdefault(name, table.detach().clone())
    g = torch.Generator().manual_seed(2)
    for key in [k for k in state if re.fullmatch(r"(blocks_[av]|decoder_blocks)\.\d+\.norm[12]\.(weight|bias)", k)]:
        for stream in ("_a", "_v"):  # the official Block builds them in every layer; its forward reads them in E_j only
            name = key.replace(".norm1.", f".norm1{stream}.").replace(".norm2.", f".norm2{stream}.")
            state[name] = torch.randn(state[key].shape, generator=g)
    if head is not None:
        state.update({"mlp_head.1.weight": head.weight.detach(), "mlp_head.1.bias": head.bias.detach()})
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return state


def reference_features(state: dict, spec: torch.Tensor, frame: torch.Tensor, heads: int = 4) -> dict:
    """The official forward (forward_feat and CAVMAEFT's modes) written from an official state dict by its names."""
    F_ = torch.nn.functional

    def ln(x, name):
        return F_.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    def block(x, b, suffix=""):
        B, N, C = x.shape
        h = ln(x, f"{b}.norm1{suffix}")
        q, k, v = F_.linear(h, state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"]).view(
            B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-1, -2)) * (C // heads) ** -0.5).softmax(-1) @ v
        x = x + F_.linear(attn.transpose(1, 2).reshape(B, N, C), state[f"{b}.attn.proj.weight"], state[f"{b}.attn.proj.bias"])
        h = F_.gelu(F_.linear(ln(x, f"{b}.norm2{suffix}"), state[f"{b}.mlp.fc1.weight"], state[f"{b}.mlp.fc1.bias"]))
        return x + F_.linear(h, state[f"{b}.mlp.fc2.weight"], state[f"{b}.mlp.fc2.bias"])

    def embed(x, m):
        x = F_.conv2d(x, state[f"patch_embed_{m}.proj.weight"], state[f"patch_embed_{m}.proj.bias"], stride=16)
        x = x.flatten(2).transpose(1, 2) + state[f"pos_embed_{m}"] + state[f"modality_{m}"]
        for i in range(len({k.split(".")[1] for k in state if k.startswith(f"blocks_{m}.")})):
            x = block(x, f"blocks_{m}.{i}")
        return x

    a, v = embed(spec, "a"), embed(frame, "v")
    out = {"joint": ln(block(torch.cat([a, v], 1), "blocks_u.0"), "norm").mean(1),
           "audio": ln(block(a, "blocks_u.0", "_a"), "norm_a").mean(1),
           "video": ln(block(v, "blocks_u.0", "_v"), "norm_v").mean(1)}
    out["missingaudioonly"] = (ln(block(a, "blocks_u.0"), "norm").mean(1) + out["audio"]) / 2
    out["missingvideoonly"] = (ln(block(v, "blocks_u.0"), "norm").mean(1) + out["video"]) / 2
    return out


@pytest.mark.parametrize("path", ["pretrained", "init_from"])
def test_an_official_pretrained_file_with_distinct_norms_loads_exactly(tmp_path, path):
    """norm, norm_a and norm_v (and every joint-layer norm) each land in their own place: the retrieval embeddings
    (audio, video) and the joint output equal the official forward on the file's tensors; every key of the file is
    loaded or named unused with its reason."""
    torch.manual_seed(0)
    source = perturbed(cav_mae_tiny(n_mels=128, audio_frames=64, audio_seconds=0.64, audio_noise=False))
    state = official_file(source, tmp_path / "official.pth")
    assert not torch.equal(state["norm_a.weight"], state["norm.weight"])
    target = cav_mae_tiny(n_mels=128, audio_frames=64, audio_seconds=0.64)
    report = target.load_pretrained(tmp_path / "official.pth") if path == "pretrained" else \
        init_backbone(target, str(tmp_path / "official.pth"))
    assert set(report.sources.values()) | set(report.unexpected) == set(state)
    assert not report.missing and not report.mismatched
    for key in report.unexpected:  # the fixed tables (equal to the built ones), the per-stream norms no layer reads
        assert ("sin-cos" if "pos_embed" in key else "per-stream LayerNorms") in report.reasons[key], key
    audio, video = inputs(seconds=0.64)
    target.eval()
    with torch.no_grad():
        out = target(audio=audio, video=video[:, :1])
        spec = target.audio_embed.inputs(audio, None, 2, spec_augment=False)
        ref = reference_features(state, spec, target.video_embed.inputs(video[:, :1], None, 2)[:, 0])
    for ours, theirs in (("audio", "audio"), ("video", "video"), ("global", "joint")):
        torch.testing.assert_close(out[ours], ref[theirs], msg=ours)


def test_an_official_pretrained_file_into_the_finetuning_model_names_the_decoder_unused(tmp_path):
    state = official_file(perturbed(cav_mae_tiny()), tmp_path / "official.pth")
    model = cav_mae_tiny(decoder_depth=0, head="official", trainable_pos=True)
    report = model.load_pretrained(tmp_path / "official.pth")
    assert set(report.sources.values()) | set(report.unexpected) == set(state)
    decoder = [k for k in state if k.startswith(("decoder", "mask_token"))]
    assert decoder and all("decoder" in report.reasons[k] for k in decoder)
    assert {"audio_embed.pos", "video_embed.pos"} <= set(report.loaded)  # learned positions start from the file's
    assert set(report.missing) == {"head_norm.weight", "head_norm.bias"}  # the new head
    assert "unused" in str(report) and "decoder_depth=0" in str(report)


def test_an_official_finetuned_file_loads_into_the_recipe_model_and_scores(tmp_path):
    """The fine-tuning recipe's model (head=official, trainable_pos) and task head take an official CAVMAEFT file
    (mlp_head = LayerNorm + Linear, learned positions) through init_from: the logits of A+V, A only and V only
    equal the official multimodal / missingaudioonly / missingvideoonly modes on the file's tensors."""
    torch.manual_seed(0)
    kw = dict(n_mels=128, audio_frames=64, audio_seconds=0.64, decoder_depth=0, head="official", trainable_pos=True)
    source, classifier = perturbed(cav_mae_tiny(**kw)), torch.nn.Linear(64, 5)
    state = official_file(source, tmp_path / "ft.pth", head=classifier)
    backbone = cav_mae_tiny(**kw, audio_noise=False)
    task = SupervisedTask(backbone=backbone, dataset=DatasetInfo(num_classes=5, multi_label=True),
                          optimizer=torch.optim.Adam)
    report = init_backbone(backbone, str(tmp_path / "ft.pth"), heads=task.heads)
    assert set(report.sources.values()) | set(report.unexpected) == set(state) and not report.missing
    assert all("per-stream LayerNorms" in report.reasons[k] for k in report.unexpected)
    audio, video = inputs(seconds=0.64)
    batch = {"audio": audio, "video": video[:, :1], "label": torch.zeros(2, 5)}
    task.eval()
    with torch.no_grad():
        spec = backbone.audio_embed.inputs(audio, None, 2, spec_augment=False)
        ref = reference_features(state, spec, backbone.video_embed.inputs(video[:, :1], None, 2)[:, 0])
        for inputs_, mode in (("audio_video", "joint"), ("audio", "missingaudioonly"), ("video", "missingvideoonly")):
            probs = task.predict_probs(batch, inputs_)["global"]
            expected = torch.nn.functional.layer_norm(ref[mode], (64,), state["mlp_head.0.weight"],
                                                      state["mlp_head.0.bias"]) @ state["mlp_head.1.weight"].T
            torch.testing.assert_close(probs, (expected + state["mlp_head.1.bias"]).sigmoid(), msg=inputs_)
    assert task.output_names == ("global",)


def test_a_finetuned_file_for_other_classes_leaves_the_head_and_says_why(tmp_path):
    kw = dict(decoder_depth=0, head="official", trainable_pos=True)
    official_file(cav_mae_tiny(**kw), tmp_path / "ft.pth", head=torch.nn.Linear(64, 7))
    backbone = cav_mae_tiny(**kw)
    task = SupervisedTask(backbone=backbone, dataset=DatasetInfo(num_classes=5, multi_label=False),
                          optimizer=torch.optim.Adam)
    report = init_backbone(backbone, str(tmp_path / "ft.pth"), heads=task.heads)
    assert "7 classes" in report.reasons["mlp_head.1.weight"]


def test_a_trained_position_table_is_not_silently_dropped_by_a_fixed_model(tmp_path):
    kw = dict(decoder_depth=0, head="official", trainable_pos=True)
    official_file(perturbed(cav_mae_tiny(**kw)), tmp_path / "ft.pth")
    report = cav_mae_tiny(decoder_depth=0).load_pretrained(tmp_path / "ft.pth")
    assert "trainable_pos=true" in report.reasons["pos_embed_a"]
    assert "head=per_output" in report.reasons["mlp_head.0.weight"]


def test_a_cav_mae_state_dict_loads_by_name(tmp_path):
    source, target = perturbed(cav_mae_tiny()), cav_mae_tiny()
    torch.save(source.state_dict(), tmp_path / "cav_mae.pth")
    report = target.load_pretrained(tmp_path / "cav_mae.pth")
    assert not report.missing and not report.unexpected and not report.mismatched
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_spec_augment_masks_the_raw_log_mel_with_zero():
    """As the official loader: SpecAugment before normalisation, so a masked band is (0 - mean) / std."""
    torch.manual_seed(0)
    model = cav_mae_tiny(spec_augment=True, audio_noise=False, freq_mask=24, time_mask=24).train()
    audio, _ = inputs()
    frontend = model.audio_embed.frontend
    spec = model.audio_embed.inputs(audio, None, 2, spec_augment=True)
    clean = frontend.fbank(audio)
    changed = spec != clean
    fill = (0 - frontend.mean) / frontend.std
    assert changed.any()
    torch.testing.assert_close(spec[changed], torch.full_like(spec[changed], fill))


def test_pretraining_checkpoints_every_block_including_the_decoder(checkpoint_calls):
    """Pre-training is where CAV-MAE needs the memory: with grad_checkpointing every encoder and decoder block runs
    under torch.utils.checkpoint, and the reconstruction and gradients are those of the plain model."""
    plain = cav_mae_tiny()
    ckpt = cav_mae_tiny(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    audio, video = inputs()
    runs = []
    for model in (plain, ckpt):
        torch.manual_seed(0)  # the same frame, masks and noise
        out = model.pretrain_forward(audio, video)
        (out["audio_pred"].square().mean() + out["video_pred"].square().mean()).backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    blocks = [*ckpt.blocks_a, *ckpt.blocks_v, *ckpt.blocks_u, *ckpt.decoder_blocks]
    assert {id(b) for b in blocks} == {id(fn) for fn in checkpoint_calls}
    (out, grads), (ckpt_out, ckpt_grads) = runs
    for k in ("audio_pred", "video_pred", "audio_mask", "video_mask"):
        torch.testing.assert_close(ckpt_out[k], out[k], msg=k)
    assert grads.keys() == ckpt_grads.keys() and any(n.startswith("decoder_blocks") for n in grads)
    for n in grads:
        torch.testing.assert_close(ckpt_grads[n], grads[n], msg=n)
