"""What is specific to Zorro-Swin (the registry tests in test_backbones.py cover the rest): the parameter count,
Swin's padding before the shift, Video Swin's 3D windows, and loading a 2D Swin into both streams."""

import pytest
import timm
import torch

from zorro.models import count_parameters, create_model, zorro_swin_tiny

# The blocks the model builds (2D: timm's, padded before the shift; 3D: Video Swin's), taken from a model so that
# these tests do not depend on the file each block lives in.
_tiny = zorro_swin_tiny()
SwinBlock2d, SwinBlock3d = type(_tiny.audio.layers[0].blocks[0]), type(_tiny.video.layers[0].blocks[0])

# Paper (appendix A): 161M. Ours, without classifier heads: 61.5M audio Swin + 62.1M video Swin + 23.0M fusion
# stream + 12.6M output decoder (Swin-B / Video Swin-B widths with 10 blocks in stage 3, a choice: the paper kept
# only the count; tests/models/test_parameter_counts.py holds every model to the paper's count).
BASE_PARAMS = 159_208_576


def test_base_parameter_count(no_random_init):
    model = create_model("zorro_swin_base")
    assert count_parameters(model) == BASE_PARAMS
    assert model.output_dim == 1024


def _copy(dst, src):
    dst.load_state_dict(src.state_dict())
    return dst


def _reads(block, x, index) -> torch.Tensor:
    """Which input positions the output at `index` depends on (bool grid, from the gradient)."""
    x = x.clone().requires_grad_(True)
    block(x)[index].sum().backward()
    return x.grad.abs().sum(-1)[0] > 0


def test_2d_block_pads_before_the_shift():
    torch.manual_seed(0)
    block = SwinBlock2d(dim=8, input_resolution=(16, 16), num_heads=2, window_size=7, shift_size=3).eval()
    rows = _reads(block, torch.randn(1, 16, 16, 8), (0, 0, 0)).any(1).nonzero().flatten().tolist()
    assert rows == [0, 1, 2]  # the shifted window at the top edge; timm's pad-after-shift also reads rows 10-15
    # Where no padding is needed it is timm's block exactly.
    timm_block = timm.models.swin_transformer.SwinTransformerBlock(dim=8, input_resolution=(14, 14), num_heads=2,
                                                                   window_size=7, shift_size=3).eval()
    ours = _copy(SwinBlock2d(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3), timm_block)
    x = torch.randn(2, 14, 14, 8)
    torch.testing.assert_close(ours.eval()(x), timm_block(x))


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("size", [14, 16])  # 16: padded to 21
def test_3d_block_on_one_frame_is_the_2d_block(shift, size):
    torch.manual_seed(0)
    block2d = SwinBlock2d(dim=8, input_resolution=(size, size), num_heads=2, window_size=7,
                          shift_size=3 if shift else 0).eval()
    block3d = _copy(SwinBlock3d(dim=8, num_heads=2, window_size=(1, 7, 7), shift=shift,
                                input_resolution=(1, size, size)), block2d).eval()  # mask built once
    x = torch.randn(2, size, size, 8)
    torch.testing.assert_close(block3d(x[:, None])[:, 0], block2d(x))


def test_shifted_windows_shift():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8, 16)
    plain = SwinBlock3d(dim=16, num_heads=2, window_size=(2, 4, 4)).eval()  # masks built on the fly for 4 x 8 x 8
    shifted = _copy(SwinBlock3d(dim=16, num_heads=2, window_size=(2, 4, 4), shift=True), plain).eval()
    assert shifted.shift_size == (1, 2, 2)
    assert not torch.allclose(plain(x), shifted(x))
    # Windows span time: unshifted, frame 1 reads frames 0-1 only; shifted, it reads frames 1-2.
    assert _reads(plain, x, (0, 1, 0, 0)).flatten(1).any(1).tolist() == [True, True, False, False]
    assert _reads(shifted, x, (0, 1, 0, 0)).flatten(1).any(1).tolist() == [False, True, True, False]
    x2 = torch.randn(1, 16, 16, 8)
    plain2d = SwinBlock2d(dim=8, input_resolution=(16, 16), num_heads=2, window_size=4, shift_size=0).eval()
    shifted2d = _copy(SwinBlock2d(dim=8, input_resolution=(16, 16), num_heads=2, window_size=4, shift_size=2),
                      plain2d).eval()
    assert not torch.allclose(plain2d(x2), shifted2d(x2))
    # Every other block of the model shifts, in both streams.
    assert [any(b.shift_size) for b in _tiny.audio.layers[0].blocks] == [False, True]
    assert [any(b.shift_size) for b in _tiny.video.layers[0].blocks] == [False, True]


def _features(embed, stream, x):
    x = embed.tokens(x)
    for stage in stream.layers:
        x = stage(x)
    return stream.norm(x)


def test_load_pretrained_timm_swin(tmp_path):
    """A tiny timm Swin saved to disk initialises both streams: the audio stream computes timm's features on a
    grey image, and the inflated video stream computes them for every frame of a still video."""
    torch.manual_seed(0)
    sizes = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=128, window_size=4,
                             num_classes=10, **sizes).eval()
    path = tmp_path / "swin.pth"
    torch.save(swin.state_dict(), path)
    model = zorro_swin_tiny(n_mels=128, sample_rate=48_000, window_size=4, video_window_size=(2, 4, 4), **sizes).eval()
    report = model.load_pretrained(path)
    assert not report.mismatched and {"head.fc.weight", "head.fc.bias"} <= set(report.unexpected)
    assert all(k.startswith(("fusion", "decoder")) for k in report.missing), report.missing
    image = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        expected = swin.forward_features(image.expand(-1, 3, -1, -1))  # RGB kernel summed = grey input
        torch.testing.assert_close(_features(model.audio_embed, model.audio, image), expected, atol=1e-4, rtol=1e-4)
        still = image.expand(-1, 3, -1, -1)[:, None].expand(-1, 4, -1, -1, -1)  # B x T x 3 x H x W
        video = _features(model.video_embed, model.video, still)
        for t in range(video.shape[1]):
            torch.testing.assert_close(video[:, t], expected, atol=1e-4, rtol=1e-4)
    # Other windows: tables cropped (windows clamped to small grids) or resized, and inflated over 15 offsets.
    report = zorro_swin_tiny(**sizes).load_pretrained(path)
    assert not report.mismatched and all(k.startswith(("fusion", "decoder")) for k in report.missing)


@pytest.mark.parametrize("kwargs, match", [
    (dict(masking="input_level"), "supports masking in"),
    (dict(masking="bottleneck"), "supports masking in"),
    (dict(masking="vanilla"), "supports masking in"),
    (dict(fusion_level=3), "fusion_level 0 only"),
])
def test_unsupported_arguments_fail_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        zorro_swin_tiny(**kwargs)
    assert "\n" not in str(err.value)
