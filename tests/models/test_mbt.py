"""What is specific to MBT (the registry tests in test_backbones.py cover the rest, including that both CLS outputs
see the other modality through the bottleneck): the parameter count, the bottleneck as the only cross-modal path,
and ImageNet ViT weights in both streams."""

import pytest
import timm
import torch

from zorro.models import count_parameters, create_model, mbt_tiny

from .helpers import inputs


def test_base_parameter_count(no_random_init):
    # Two ViT-B/16 streams (2 x 85.6M without heads) + 4 bottleneck tokens; MBT does not state a count.
    assert count_parameters(create_model("mbt_base")) == pytest.approx(172.42e6, rel=1e-3)


@pytest.mark.parametrize("kwargs", [dict(num_bottleneck=0), dict(fusion_layer=4)], ids=["late_fusion", "L_f=depth"])
def test_without_a_bottleneck_layer_the_streams_are_independent(kwargs):
    """No bottleneck tokens, or a fusion layer past the last layer: two independent ViTs (MBT's late fusion)."""
    torch.manual_seed(0)
    model = mbt_tiny(**kwargs).eval()
    (audio, video), (audio2, video2) = inputs(seed=0), inputs(seed=1)
    with torch.no_grad():
        base, new_audio, new_video = (model(audio=a, video=v) for a, v in ((audio, video), (audio2, video), (audio, video2)))
    assert torch.equal(base["video"], new_audio["video"]) and torch.equal(base["audio"], new_video["audio"])
    assert not torch.equal(base["audio"], new_audio["audio"]) and not torch.equal(base["video"], new_video["video"])


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
