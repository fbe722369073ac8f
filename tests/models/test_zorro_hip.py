"""What is specific to Zorro-HiP (the registry tests in test_backbones.py cover the rest, the decoder variant
included): the HiP-16 parameter count, one set of block weights for three streams, the fusion stream skipping
block 0, the grouped block against a per-group loop, and the initialisation that lets it learn."""

import math

import pytest
import torch

from zorro.models import count_parameters, create_model
from zorro.models.routing import Routing
from zorro.models.zorro_hip import HiPBlock, group_tokens, zorro_hip_tiny

from .helpers import inputs

# Paper (appendix A): 136M. Ours (HiP-16 with 28 layers in block 2, our stems and output decoder): encoder + processor
# blocks (default), and all seven blocks (decoder=True).
BASE_PARAMS = {False: 134.57e6, True: 131.79e6}


@pytest.mark.parametrize("decoder", [False, True])
def test_base_parameter_count(decoder, no_random_init):
    model = create_model("zorro_hip_base", decoder=decoder)
    assert count_parameters(model) == pytest.approx(BASE_PARAMS[decoder], rel=1e-3)
    assert model.output_dim == (128 if decoder else 1024) and len(model.blocks) == (7 if decoder else 4)


def test_streams_share_every_block_weight():
    # The fusion stream adds its starting embeddings and two output queries (fusion, global), no block weights.
    zorro, two = zorro_hip_tiny(masking="zorro"), zorro_hip_tiny(masking="two_streams")
    assert count_parameters(zorro) - count_parameters(two) == zorro.fusion_latents.numel() + 2 * zorro.output_dim
    assert [n for n, _ in zorro.blocks.named_parameters()] == [n for n, _ in two.blocks.named_parameters()]
    # A block maps the same tokens to the same latents whichever stream they belong to.
    torch.manual_seed(0)
    block = zorro.blocks[1].eval()
    t = torch.randn(2, 32, 32)
    with torch.no_grad():
        out = block({"audio": t, "video": t}, zorro.routing)
        alone = block({"fusion": t}, zorro.routing)  # fusion reads every present stream: here only itself
    assert torch.equal(out["audio"], out["video"])
    torch.testing.assert_close(alone["fusion"], out["audio"])


def test_audio_gradient_reaches_the_shared_blocks_and_not_the_video_stem():
    torch.manual_seed(0)
    model = zorro_hip_tiny()
    audio, video = inputs()
    model(audio, video)["audio"].square().sum().backward()  # not .sum(): the final LayerNorm's sum has no gradient
    for block in model.blocks:
        for p in (block.latents, block.cross.q.weight, block.cross.kv.weight, block.blocks[0].attn.qkv.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.audio_embed.patch.proj.weight.grad.abs().sum() > 0
    for p in (model.video_embed.patch.proj.weight, model.fusion_latents):
        assert p.grad is None or not p.grad.any()


def test_fusion_stream_skips_the_first_block():
    torch.manual_seed(0)
    model = zorro_hip_tiny(decoder=True).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(dict(args[0])))
    audio, video = inputs()
    with torch.no_grad():
        model(audio, video)
    assert sorted(seen[0]) == ["audio", "video"]
    assert all(sorted(x) == ["audio", "fusion", "video"] for x in seen[1:])
    # Block 1's fusion input is the learned embeddings themselves: block 0 never ran on them.
    assert torch.equal(seen[1]["fusion"], model.fusion_latents.expand(2, -1, -1))
    assert seen[1]["fusion"].shape == (2, 6, seen[1]["audio"].shape[-1])  # n_fusion = 6 of block 0's width


def test_block_equals_per_group_reference():
    """The grouped, batched block against a loop over streams and groups with explicit attention."""
    torch.manual_seed(0)
    routing = Routing.from_masking("zorro")
    block = HiPBlock(in_dim=16, dim=24, num_groups=3, num_latents=5, depth=2, num_heads=4, cross_heads=2).double()
    block.eval()
    x = {"audio": torch.randn(2, 9, 16), "fusion": torch.randn(2, 6, 16), "video": torch.randn(2, 10, 16)}
    x = {k: v.double() for k, v in x.items()}  # video: 10 tokens in 3 groups of 3, 3 and 4
    with torch.no_grad():
        out = block(x, routing)
        cross = block.cross
        for s in x:
            latents = []
            for g in range(3):
                keys = torch.cat([_chunk(x[r], 3, g) for r in routing.reads[s]], dim=1)  # B x n x 16
                q = cross.q(cross.norm_q(block.latents[g]))  # L x 16
                k, v = cross.kv(cross.norm_kv(keys)).chunk(2, dim=-1)
                heads = [torch.softmax(q[:, h] @ k[..., h].transpose(1, 2) / math.sqrt(8), -1) @ v[..., h]
                         for h in (slice(0, 8), slice(8, 16))]
                z = cross.proj(torch.cat(heads, -1)) + block.latents[g]
                latents.append(z + cross.mlp(cross.norm_mlp(z)))
            z = torch.stack(latents, 1).flatten(0, 1)  # (B G) x L x 24
            for layer in block.blocks:
                z = layer(z)
            torch.testing.assert_close(out[s], z.reshape(2, 15, 24))


def _chunk(x, groups, g):
    n = x.shape[1]
    return x[:, n * g // groups: n * (g + 1) // groups]


def test_group_tokens_splits_evenly_and_keeps_order():
    x = torch.arange(10.0).view(1, 10, 1)
    grouped, valid = group_tokens(x, 4)
    assert grouped.shape == (1, 4, 3, 1) and valid.sum(1).tolist() == [2, 3, 2, 3]
    assert grouped[0][valid].flatten().tolist() == list(range(10))
    assert group_tokens(x, 5)[1] is None
    with pytest.raises(ValueError, match="groups"):
        group_tokens(x, 11)


def test_bad_arguments_fail_clearly():
    for masking in ("input_level", "bottleneck", "vanilla"):
        with pytest.raises(ValueError, match="supports masking in \\('zorro', 'two_streams'\\)"):
            zorro_hip_tiny(masking=masking)
    with pytest.raises(ValueError, match="fusion_level 0 only"):
        zorro_hip_tiny(fusion_level=3)
    with pytest.raises(ValueError, match="one entry per HiP block"):
        zorro_hip_tiny(depths=(1, 1))


def test_tiny_model_fits_four_clips():
    """Guards the initialisation: with ViT's 0.02-std init the latents hardly depend on the input and this loss
    stays at log(4) (see init_hip_weights)."""
    torch.manual_seed(0)
    model = zorro_hip_tiny(spec_augment=False)
    head = torch.nn.Linear(model.output_dim, 4)
    audio, video = inputs(batch=4)
    labels = torch.arange(4)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(head(model(audio, video)["global"]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * math.log(4)  # 0.1 here; 1.39 with the 0.02-std init
