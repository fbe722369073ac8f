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
    # scenic's spectrogram is a (time x mel) image: the summed RGB kernel's rows act on time (our layout: columns)
    torch.testing.assert_close(model.audio_embed.patch.proj.weight,
                               vit.patch_embed.proj.weight.sum(1, keepdim=True).transpose(-1, -2))
    torch.testing.assert_close(model.video_embed.patch.proj.weight, vit.patch_embed.proj.weight)
    # scenic adds the ViT's CLS position to the CLS token; its spectrogram CLS token is not restored (zero init)
    torch.testing.assert_close(model.video.cls_token, vit.cls_token + vit.pos_embed[:, :1])
    torch.testing.assert_close(model.audio.cls_token, vit.pos_embed[:, :1])
    torch.testing.assert_close(model.norm.weight, vit.norm.weight)  # one final norm for both streams (scenic's)
    assert report.missing == ["bottleneck"] and sorted(report.unexpected) == ["head.bias", "head.weight"]
    assert {k for k, *_ in report.resized} == {"audio_embed.pos", "video_embed.pos",
                                               "audio_embed.patch.proj.weight", "audio.cls_token", "video.cls_token"}
    assert "resized" in str(report)


def test_imagenet_positions_are_resized_as_scenic_bilinear_with_time_on_the_grids_rows(tmp_path):
    """scipy.ndimage.zoom(order=1) (scenic): a grid whose value is its row index becomes, on the audio grid, values
    evenly spaced from the first row's to the last row's along time, the same for every mel row."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=1, num_heads=4)
    rows = torch.arange(14.0).view(14, 1, 1).expand(14, 14, 64)
    with torch.no_grad():
        vit.pos_embed[:, 1:] = rows.reshape(1, 196, 64)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = mbt_tiny(depth=1, fusion_layer=1)
    model.load_pretrained(tmp_path / "vit.pth")
    freq, time = model.audio_embed.grid
    audio = model.audio_embed.pos.detach().reshape(freq, time, 64)[..., 0]
    torch.testing.assert_close(audio, torch.linspace(0, 13, time).expand(freq, time))
    frames = model.video_embed.pos.detach().reshape(*model.video_embed.grid, 64)[..., 0]
    h, w = model.video_embed.grid[1:]
    torch.testing.assert_close(frames, torch.linspace(0, 13, h).view(1, h, 1).expand(model.video_embed.grid))
