"""The attention backends of RoutedAttention (sdpa_slices, flex, dense_mask): the same function, chosen per device."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from zorro.models import MASKINGS, zorro_vit_tiny
from zorro.models.layers import RoutedAttention, flex_block_mask
from zorro.models.routing import Routing, TokenLayout

from .helpers import inputs
from .reference import assert_model_equals_dense_mask_reference

LAYOUT = TokenLayout.of(audio=13, fusion=3, video=21)  # groups straddle 8-token tiles
NON_CONTIGUOUS = {"audio": ["audio", "video"], "fusion": ["audio", "fusion", "video"], "video": ["video"]}
TABLES = {**{m: Routing.from_masking(m) for m in MASKINGS}, "custom": Routing.from_masking("custom", NON_CONTIGUOUS)}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_block_mask_matches_torch_create_block_mask(name):
    """Our tile tables (built from the routing table with tensor ops) equal torch's, evaluated token by token."""
    routing = TABLES[name]
    layout = LAYOUT if routing.has_fusion else TokenLayout.of(audio=13, video=21)
    dense = routing.dense_mask(layout)
    ours = flex_block_mask(routing, layout, "cpu", block_size=8)
    theirs = create_block_mask(lambda b, h, q, k: dense[q, k], None, None, layout.total, layout.total,
                               device="cpu", BLOCK_SIZE=8)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    if name == "zorro":  # the audio query tile reads only audio tiles: the video tiles are skipped, not masked
        assert ours.kv_num_blocks[0, 0, 0] + ours.full_kv_num_blocks[0, 0, 0] == 2


@pytest.mark.parametrize("name", sorted(TABLES))
def test_flex_over_many_tiles_equals_sdpa_with_the_mask(name, flex_backward_on_cpu):
    routing = TABLES[name]
    layout = LAYOUT if routing.has_fusion else TokenLayout.of(audio=13, video=21)
    q, k, v = torch.randn(3, 2, 2, layout.total, 8, dtype=torch.double).unbind(0)
    grads = []
    block_mask = flex_block_mask(routing, layout, "cpu", block_size=8)
    for fn in (lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask),
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=routing.dense_mask(layout))):
        t = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = fn(*t)
        grads.append((out, *torch.autograd.grad(out.square().sum(), t)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["auto", "flex", "dense_mask"])
def test_custom_non_contiguous_table_trains_and_equals_the_reference(backend, flex_backward_on_cpu):
    torch.manual_seed(0)
    model = zorro_vit_tiny(masking="custom", masking_reads=NON_CONTIGUOUS, spec_augment=False,
                           attention_backend=backend).double()
    audio, video = inputs()
    assert_model_equals_dense_mask_reference(model, audio, video.double())
    # audio reads video under this table: the audio output is no longer modality-pure
    with torch.no_grad():
        assert not torch.equal(model(audio, video.double())["audio"], model(audio, video.double() * 0)["audio"])


def test_slices_refuse_a_non_contiguous_table_with_a_clear_message():
    model = zorro_vit_tiny(masking="custom", masking_reads=NON_CONTIGUOUS, attention_backend="sdpa_slices")
    with pytest.raises(ValueError, match="not one contiguous slice.*use attention_backend flex or dense_mask"):
        model(*inputs())


def test_auto_picks_one_call_per_layer_on_cuda_and_the_measured_best_on_cpu():
    attn = RoutedAttention(dim=16, num_heads=2)
    zorro, custom = TABLES["zorro"], TABLES["custom"]
    assert attn.backend("cuda", LAYOUT, zorro) == "flex"
    assert attn.backend("cuda", LAYOUT, TABLES["input_level"]) == "sdpa_slices"  # one dense call, flash-eligible
    assert attn.backend("cuda", TokenLayout.of(fusion=6), zorro) == "sdpa_slices"  # a single-group stream
    assert attn.backend("cpu", LAYOUT, zorro) == "sdpa_slices"
    assert attn.backend("cpu", LAYOUT, custom) == "dense_mask"
    dropping = RoutedAttention(dim=16, num_heads=2, attn_drop=0.1).train()
    assert dropping.backend("cuda", LAYOUT, zorro) == "sdpa_slices"  # flex has no attention dropout
    assert dropping.backend("cuda", LAYOUT, custom) == "dense_mask"


def test_bad_backend_options_fail_clearly():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        zorro_vit_tiny(attention_backend="flash")
    with pytest.raises(ValueError, match="no attention dropout"):
        RoutedAttention(dim=16, num_heads=2, attention_backend="flex", attn_drop=0.1)
    with pytest.raises(ValueError, match="needs audio and video rows"):
        zorro_vit_tiny(masking="custom", masking_reads={"audio": ["audio"]})
    with pytest.raises(ValueError, match="must read itself"):
        zorro_vit_tiny(masking="custom", masking_reads={"audio": ["video"], "video": ["video"]})


def test_compiled_block_traces_the_block_mask(flex_backward_on_cpu):
    """torch.compile(fullgraph=True) of a block builds the block mask inside the graph (no cache lookup, no graph
    break), as when trainer=gpu compiles the backbone; forward and backward equal eager. The aot_eager backend
    checks the tracing that CUDA's compile does; torch's CPU FlexAttention kernel (inductor) has no backward."""
    from zorro.models.layers import Block

    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, attention_backend="flex").double()
    routing = TABLES["bottleneck"]
    x = torch.randn(2, LAYOUT.total, 32, dtype=torch.double)
    results = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        t = x.clone().requires_grad_(True)
        out = fn(t, LAYOUT, routing)
        results.append((out, *torch.autograd.grad(out.square().sum(), [t, block.attn.qkv.shared.weight])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
