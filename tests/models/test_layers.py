import pytest
import torch

from zorro.models import MASKINGS, zorro_vit_tiny
from zorro.models.layers import ATTENTION_BACKENDS, Groupwise, OutputDecoder, RoutedAttention, resample_pos_embed
from zorro.models.routing import Routing, TokenLayout

from .helpers import inputs
from .reference import assert_model_equals_dense_mask_reference, dense_mask_attention

BACKENDS = [b for b in ATTENTION_BACKENDS if b != "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("masking", sorted(MASKINGS))
def test_routed_attention_equals_dense_mask(masking, separate, backend, flex_backward_on_cpu):
    torch.manual_seed(0)
    routing = Routing.from_masking(masking)
    layout = TokenLayout.of(audio=6, fusion=3 if routing.has_fusion else 0, video=9)
    attn = RoutedAttention(dim=32, num_heads=4, separate_weights=separate, attention_backend=backend).double()
    x = torch.randn(2, layout.total, 32, dtype=torch.double, requires_grad=True)
    out = attn(x, layout, routing)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = dense_mask_attention(attn, x_ref, layout, routing)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("fusion_level", [0, 2])
@pytest.mark.parametrize("masking", sorted(MASKINGS))
def test_model_equals_dense_mask_reference(masking, fusion_level, backend, flex_backward_on_cpu):
    """The whole backbone (outputs and parameter gradients), each attention backend, against the dense-mask
    implementation (explicit softmax, tests/models/reference.py)."""
    if masking == "two_streams" and fusion_level:
        pytest.skip("two_streams has no fusion latents")
    torch.manual_seed(0)
    model = zorro_vit_tiny(masking=masking, fusion_level=fusion_level, spec_augment=False,
                           attention_backend=backend).double().eval()
    audio, video = inputs()
    assert_model_equals_dense_mask_reference(model, audio, video.double())


def test_groupwise_separate_weights_apply_per_group():
    layout = TokenLayout.of(audio=2, fusion=1, video=3)
    g = Groupwise(lambda: torch.nn.Linear(4, 4), separate=True)
    x = torch.randn(1, 6, 4)
    out = g(x, layout)
    torch.testing.assert_close(out[:, 3:], g.parts["video"](x[:, 3:]))
    torch.testing.assert_close(out[:, :2], g.parts["audio"](x[:, :2]))


def test_decoder_outputs_read_only_their_groups():
    torch.manual_seed(0)
    dec = OutputDecoder(dim=16, num_heads=2)
    layout = TokenLayout.of(audio=3, fusion=2, video=4)
    x = torch.randn(1, 9, 16)
    base = dec(x, layout)
    x2 = x.clone()
    x2[:, :3] = torch.randn(1, 3, 16)  # change only the audio tokens
    changed = dec(x2, layout)
    assert torch.equal(base["video"], changed["video"]) and torch.equal(base["fusion"], changed["fusion"])
    assert not torch.allclose(base["audio"], changed["audio"]) and not torch.allclose(base["global"], changed["global"])


def test_resample_pos_embed_keeps_identity_and_resizes():
    pos = torch.randn(1, 2 * 3 * 3, 8)
    assert resample_pos_embed(pos, (2, 3, 3), (2, 3, 3)) is pos
    assert resample_pos_embed(pos, (2, 3, 3), (4, 5, 5)).shape == (1, 100, 8)
    with pytest.raises(ValueError):
        resample_pos_embed(pos, (3, 3, 3), (4, 4, 4))
