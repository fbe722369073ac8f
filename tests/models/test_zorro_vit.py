import pytest
import torch

from zorro.models import MASKINGS, MODELS, count_parameters, create_model, zorro_vit_tiny

from .test_layers import inputs

# Paper (appendix A): 98M (ViT-B), 267M with separate weights. Ours, without classifier heads:
BASE_PARAMS = {False: 94.25e6, True: 264.36e6}


@pytest.mark.parametrize("separate", [False, True])
def test_base_parameter_count(separate):
    model = create_model("zorro_vit_base", separate_weights=separate)
    assert count_parameters(model) == pytest.approx(BASE_PARAMS[separate], rel=1e-3)


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("zorro_vit") and n.endswith("tiny")])
@pytest.mark.parametrize("masking", sorted(MASKINGS))
def test_forward_backward_and_output_keys(name, masking):
    model = create_model(name, masking=masking)
    audio, video = inputs()
    out = model(audio, video)
    expected = {"audio", "video"} | ({"fusion", "global"} if masking != "two_streams" else set())
    assert set(out) == expected == set(model.output_names)
    for v in out.values():
        assert v.shape == (2, model.output_dim) and torch.isfinite(v).all()
    sum(v.sum() for v in out.values()).backward()
    assert model.audio_embed.proj.weight.grad is not None and model.video_embed.proj.weight.grad is not None


def _perturbation_changes(masking: str, perturbed: str) -> dict[str, bool]:
    torch.manual_seed(0)
    model = zorro_vit_tiny(masking=masking).eval()
    audio, video = inputs(seed=0)
    audio2, video2 = inputs(seed=1)
    with torch.no_grad():
        base = model(audio, video)
        other = model(audio2, video) if perturbed == "audio" else model(audio, video2)
    return {k: not torch.equal(base[k], other[k]) for k in base}


@pytest.mark.parametrize("masking", ["zorro", "two_streams"])
def test_unimodal_outputs_are_modality_pure(masking):
    changed = _perturbation_changes(masking, "audio")
    assert not changed["video"] and changed["audio"]
    changed = _perturbation_changes(masking, "video")
    assert not changed["audio"] and changed["video"]
    if masking == "zorro":  # the joint outputs see both modalities (two_streams has none)
        assert changed["fusion"] and changed["global"]
        assert _perturbation_changes(masking, "audio")["fusion"] and _perturbation_changes(masking, "audio")["global"]


@pytest.mark.parametrize("masking", ["input_level", "bottleneck"])
def test_entangled_maskings_leak_across_modalities(masking):
    assert _perturbation_changes(masking, "audio")["video"]
    assert _perturbation_changes(masking, "video")["audio"]


def test_missing_modality_zero_input_and_flags():
    torch.manual_seed(0)
    model = zorro_vit_tiny().eval()
    audio, video = inputs()
    with torch.no_grad():
        absent = model(audio, None)  # paper: the missing input is zeroed
        flagged = model(audio, video, has_video=torch.tensor([False, False]))
        mixed = model(audio, video, has_video=torch.tensor([True, False]))
        full = model(audio, video)
    for k in absent:
        torch.testing.assert_close(absent[k], flagged[k])
    torch.testing.assert_close(mixed["global"][0], full["global"][0])
    torch.testing.assert_close(mixed["global"][1], flagged["global"][1])


def test_drop_missing_modality_runs_only_the_present_stream():
    torch.manual_seed(0)
    model = zorro_vit_tiny(missing_modality="drop").eval()
    audio, video = inputs()
    with torch.no_grad():
        audio_only = model(audio, None)
        full = model(audio, video)
    assert set(audio_only) == {"audio", "fusion", "global"}
    torch.testing.assert_close(audio_only["audio"], full["audio"])  # the audio stream never reads video


def test_other_input_sizes_interpolate_position_embeddings():
    model = zorro_vit_tiny().eval()
    audio = torch.zeros(1, 16000 * 2, dtype=torch.int16)  # 2 s instead of 1.28 s
    video = torch.zeros(1, 6, 3, 96, 96, dtype=torch.uint8)  # 6 frames of 96^2 instead of 4 of 64^2
    out = model(audio, video)
    assert out["global"].shape == (1, model.output_dim)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown masking"):
        zorro_vit_tiny(masking="vanilla")
    with pytest.raises(ValueError, match="fusion_level"):
        zorro_vit_tiny(fusion_level=9)
    with pytest.raises(ValueError, match="at least one"):
        zorro_vit_tiny()(None, None)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        zorro_vit_tiny()(None, torch.zeros(1, 4, 3, 70, 70, dtype=torch.uint8))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = zorro_vit_tiny(spec_augment=False)
    ckpt = zorro_vit_tiny(spec_augment=False, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    audio, video = inputs()
    grads = []
    for model in (plain, ckpt):
        model.train()
        sum(v.square().sum() for v in model(audio, video).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
