import pytest
import timm
import torch

from zorro.models import count_parameters, create_model, mbt_tiny

from .test_layers import inputs


def test_base_parameter_count():
    # Two ViT-B/16 streams (2 x 85.6M without heads) + 4 bottleneck tokens; MBT does not state a count.
    assert count_parameters(create_model("mbt_base")) == pytest.approx(172.42e6, rel=1e-3)


def test_forward_backward_cls_outputs():
    model = mbt_tiny()
    audio, video = inputs()
    out = model(audio, video)
    assert set(out) == set(model.output_names) == {"audio", "video"}
    assert all(v.shape == (2, model.output_dim) for v in out.values())
    w = torch.randn(model.output_dim)  # not a plain sum: a LayerNorm output sums to a constant (zero gradient)
    ((out["audio"] * w).sum() + (out["video"] * w).sum()).backward()
    assert model.bottleneck.grad is not None and model.bottleneck.grad.abs().sum() > 0
    assert model.audio.blocks[0].attn.qkv.weight.grad is not None


def _changes(perturbed: str, **kw) -> dict[str, bool]:
    torch.manual_seed(0)
    model = mbt_tiny(**kw).eval()
    audio, video = inputs(seed=0)
    audio2, video2 = inputs(seed=1)
    with torch.no_grad():
        base = model(audio, video)
        other = model(audio2, video) if perturbed == "audio" else model(audio, video2)
    return {k: not torch.equal(base[k], other[k]) for k in base}


def test_information_crosses_only_through_the_bottleneck():
    # With bottlenecks, each CLS output sees the other modality (MBT fuses; unlike Zorro's unimodal outputs) ...
    assert _changes("audio")["video"] and _changes("video")["audio"]
    # ... and without them (late fusion) the streams are independent: the bottleneck is the only path.
    assert _changes("audio", num_bottleneck=0) == {"audio": True, "video": False}
    assert _changes("video", num_bottleneck=0) == {"audio": False, "video": True}


def test_layers_before_the_fusion_layer_are_unimodal():
    torch.manual_seed(0)
    model = mbt_tiny(fusion_layer=4).eval()  # depth 4: the bottleneck never joins
    audio, video = inputs(seed=0)
    _, video2 = inputs(seed=1)
    with torch.no_grad():
        assert torch.equal(model(audio, video)["audio"], model(audio, video2)["audio"])


def test_imagenet_vit_weights_load_into_both_streams(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=4, num_heads=4)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")  # MAE-style wrapper is unwrapped
    model = mbt_tiny()
    report = model.load_pretrained(tmp_path / "vit.pth")
    for stream in (model.audio, model.video):
        torch.testing.assert_close(stream.blocks[3].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight)
    torch.testing.assert_close(model.audio.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    assert report.missing == ["bottleneck"] and sorted(report.unexpected) == ["head.bias", "head.weight"]
    assert {k for k, *_ in report.resized} == {"audio.pos_embed", "video.pos_embed", "audio.patch_embed.proj.weight"}
    assert "resized" in str(report)
