"""What is specific to CAV-MAE (the registry tests in test_backbones.py cover outputs, gradients, information flow,
other frame sizes, checkpointing and no_weight_decay): the paper's parameter counts, frame averaging, the masking
modes, MAE targets, the official fbank, and loading image MAE / CAV-MAE weights."""

import pytest
import timm
import torch
import torchaudio

from zorro.models import cav_mae_base, cav_mae_tiny, count_parameters
from zorro.models.cav_mae import KaldiFbank, random_masking

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
    assert model.audio_grid == (8, 64) and model.video_grid == (14, 14)  # 512 audio and 196 video patches


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
    for name, grid in (("audio", model.audio_grid), ("video", model.video_grid)):
        L = grid[0] * grid[1]
        mask = out[f"{name}_mask"]
        assert mask.shape == (2, L) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum(1) == L - int(L * (1 - ratio))).all()  # exactly int(L * (1 - ratio)) tokens kept
        assert out[f"{name}_pred"].shape == out[f"{name}_target"].shape == out[f"{name}_patches"].shape
    if mask_mode != "random":  # whole time columns / frequency rows of the (F x T) patch grid are hidden
        f, t = model.audio_grid
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
    torch.testing.assert_close(model.patch_embed_v.proj.weight, state["patch_embed.proj.weight"])
    torch.testing.assert_close(model.patch_embed_a.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.decoder_pred_a.weight, state["decoder_pred.weight"][:256])
    torch.testing.assert_close(model.decoder_pred_v.weight, state["decoder_pred.weight"])
    assert {"cls_token", "pos_embed"} <= set(report.unexpected) and not report.mismatched
    assert "modality_a" in report.missing and "decoder_blocks.0.attn.qkv.weight" in report.missing


def test_a_cav_mae_state_dict_loads_by_name(tmp_path):
    source, target = cav_mae_tiny(), cav_mae_tiny()
    torch.save(source.state_dict(), tmp_path / "cav_mae.pth")
    report = target.load_pretrained(tmp_path / "cav_mae.pth")
    assert not report.missing and not report.unexpected and not report.mismatched
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


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
