"""What every registered backbone promises, checked over the registry's tiny variants (timm's test_models.py):
the output dict and its gradients, information flow as the routing table says, other input sizes by value,
activation checkpointing that really runs, and no_weight_decay() names that exist and cover the free tensors.
Only the public model API is used, so the tests hold across refactors of the backbone files."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zorro.models import MASKINGS, MODELS, OUTPUTS, create_model

from .helpers import inputs

TINY = sorted(n for n in MODELS if n.endswith("_tiny"))
MODALITIES = ("audio", "video")
# Variants that run code the default does not: HiP's decoder half (three more blocks, U-Net skips) and Zorro-ViT's
# separate weights per token group (paper: 98M -> 267M).
VARIANTS = {"zorro_hip_tiny": [{}, {"decoder": True}], "zorro_vit_tiny": [{}, {"separate_weights": True}]}


@functools.cache
def _maskings(name: str) -> tuple:
    """The named maskings a backbone supports (custom tables need a table: see test_attention_backends.py);
    (None,) for the baselines, which have no masking option."""
    return tuple(m for m in getattr(create_model(name), "maskings", (None,)) if m is None or m in MASKINGS)


def _case_id(name, kwargs):
    return "-".join([name, *(str(v) if k == "masking" else f"{k}={v}" for k, v in kwargs.items())])


def _cases(with_maskings: bool = True):
    cases = []
    for name in TINY:
        for variant in VARIANTS.get(name, [{}]):
            for masking in _maskings(name) if with_maskings else (None,):
                kwargs = {**variant, **({"masking": masking} if masking else {})}
                cases.append(pytest.param(name, kwargs, id=_case_id(name, kwargs)))
    return cases


def _loss(out: dict) -> torch.Tensor:
    """A random projection of every output: a plain sum of a LayerNorm output is a constant (zero gradient)."""
    g = torch.Generator().manual_seed(0)
    return sum((v * torch.randn(v.shape[-1], generator=g)).sum() for _, v in sorted(out.items()))


# CAV-MAE's reconstruction decoder (D_j, mask token, decoder modality embeddings) runs only in pretrain_forward.
NOT_IN_FORWARD = {"cav_mae_tiny": ("decoder", "mask_token")}


@pytest.mark.parametrize("name,kwargs", _cases())
def test_forward_backward(name, kwargs):
    """Every output the model names is present, B x output_dim and finite; every parameter that forward uses
    gets a finite, non-zero gradient, and the ones it must not use get none."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    audio, video = inputs()
    out = model(audio=audio, video=video)
    assert set(out) == set(model.output_names) and set(MODALITIES) <= set(out)
    for k, v in out.items():
        assert v.shape == (2, model.output_dim) and torch.isfinite(v).all(), k
    _loss(out).backward()
    unused = NOT_IN_FORWARD.get(name, ())
    for n, p in model.named_parameters():
        if n.startswith(unused):
            assert p.grad is None or not p.grad.any(), f"{n} is not used in forward but got a gradient"
        else:
            assert p.grad is not None and p.grad.any() and torch.isfinite(p.grad).all(), f"{n}: no gradient"
    if unused:  # the exemption covers real parameters, not a typo
        assert any(n.startswith(unused) for n, _ in model.named_parameters())


# -- information flow ---------------------------------------------------------------------------------------------
# The baselines have no routing table; what their outputs read is their paper's design: MBT's CLS tokens both see
# the other modality through the bottleneck tokens (from layer L_f on); CAV-MAE's c_a / c_v are single-modality
# passes of the joint layer and only the joint pass reads both (eqs. 4-6).
BASELINE_FLOW = {"mbt_tiny": {"audio": {"audio", "video"}, "video": {"audio", "video"}},
                 "cav_mae_tiny": {"audio": {"audio"}, "video": {"video"}, "global": {"audio", "video"}}}


def _reaches(reads: dict, group: str, modality: str) -> bool:
    """Whether `group`'s tokens depend on `modality` through any number of layers (the closure of the table)."""
    seen, todo = set(), [group]
    while todo:
        g = todo.pop()
        if g not in seen and g in reads:
            seen.add(g)
            todo += reads[g]
    return modality in seen


def expected_flow(name: str, model) -> dict[str, set[str]]:
    """{output: modalities it reads}, from the model's routing table (and OUTPUTS) where it has one."""
    if not hasattr(model, "routing"):
        return BASELINE_FLOW[name]
    reads = model.routing.reads
    return {o: {m for m in MODALITIES if any(_reaches(reads, g, m) for g in OUTPUTS[o])} for o in model.output_names}


@pytest.mark.parametrize("name,kwargs", _cases())
def test_information_flow_follows_the_routing_table(name, kwargs):
    """Perturb the audio only: exactly the outputs whose reads reach audio change (the others are bitwise equal);
    the same for video. Zorro and two_streams keep the unimodal outputs pure, input_level and bottleneck do not."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    if "masking" in kwargs:  # the table the flow is read from is the masking asked for, not a default
        assert {g: tuple(r) for g, r in model.routing.reads.items()} == MASKINGS[kwargs["masking"]]
    expected = expected_flow(name, model)
    assert set(expected) == set(model.output_names)
    (audio, video), (audio2, video2) = inputs(seed=0), inputs(seed=1)
    with torch.no_grad():
        base = model(audio=audio, video=video)
        perturbed = {"audio": model(audio=audio2, video=video), "video": model(audio=audio, video=video2)}
    for m, out in perturbed.items():
        for k in base:
            diff = (out[k] - base[k]).abs().max().item()
            if m in expected[k]:  # any change: the bottleneck leak through 6 latents is ~1e-4 at init
                assert diff > 0, f"{k} reads {m} but did not change"
            else:
                assert diff == 0, f"{k} must not read {m}, changed by {diff:.2e}"


@pytest.mark.parametrize("name", TINY)
def test_an_absent_modality_is_a_zero_input_per_sample(name):
    """None, all-False flags and per-sample flags give the paper's zero input; flags are per sample."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    audio, video = inputs()
    with torch.no_grad():
        full = model(audio=audio, video=video)
        for m, kwargs in (("video", dict(audio=audio)), ("audio", dict(video=video))):
            absent = model(**kwargs)
            flagged = model(audio=audio, video=video, **{f"has_{m}": torch.tensor([False, False])})
            mixed = model(audio=audio, video=video, **{f"has_{m}": torch.tensor([True, False])})
            assert absent.keys() == flagged.keys() == mixed.keys() == full.keys()
            for k in full:
                torch.testing.assert_close(absent[k], flagged[k], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(mixed[k][0], full[k][0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(mixed[k][1], flagged[k][1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at least one"):
        model(audio=None, video=None)


# -- other input sizes, by value --------------------------------------------------------------------------------
# Per backbone: a configuration S2 other than the tiny one, the input of that size, and its size-dependent
# tables {state key: (grid at S, grid at S2)}. Learned absolute positions (ViT, MBT, HiP) are resampled
# (bicubic in 2D, trilinear in 3D). Swin has only relative positions (no table changes); its 2D audio windows
# are clamped to the configured grid at construction (timm), so the audio length keeps the tiny model's clamping
# (1.16 s: the same window per stage, a differently padded grid) while video windows adapt per input. CAV-MAE's
# positions are fixed sin-cos tables (rebuilt for the new frame grid); its fbank is always padded/cut to the
# configured frames (official code), so only the frame size varies. HiP's Fourier features take their
# frequencies from the configured grid (Perceiver's max resolution): a model configured at S2 is another function
# by design, so HiP is checked with fourier_bands=0 (positions in [-1, 1] only), which isolates the resampling.
SIZES = {
    "zorro_vit_tiny": dict(config=dict(audio_seconds=2.56, num_frames=6, image_size=96),
                           input=dict(seconds=2.56, frames=6, size=96),
                           tables={"audio_embed.pos": ((4, 8), (4, 16)), "video_embed.pos": ((4, 4, 4), (6, 6, 6))}),
    "mbt_tiny": dict(config=dict(audio_seconds=2.56, num_frames=6, image_size=96),
                     input=dict(seconds=2.56, frames=6, size=96),
                     tables={"audio_embed.pos": ((4, 8), (4, 16)), "video_embed.pos": ((4, 4, 4), (6, 6, 6))}),
    "zorro_hip_tiny": dict(fixed=dict(fourier_bands=0), config=dict(audio_seconds=2.56, num_frames=3, image_size=80),
                           input=dict(seconds=2.56, frames=3, size=80),  # 75 video tokens: uneven groups
                           tables={"audio_embed.pos": ((8, 16), (8, 32)), "video_embed.pos": ((4, 4, 4), (3, 5, 5))}),
    "zorro_swin_tiny": dict(config=dict(audio_seconds=1.16, num_frames=6, image_size=96),
                            input=dict(seconds=1.16, frames=6, size=96), tables={}),
    "cav_mae_tiny": dict(config=dict(num_frames=6, image_size=96), input=dict(frames=6, size=96), tables={}),
}


def resample(table: torch.Tensor, old, new, mode: str | None = None) -> torch.Tensor:
    """The reference: a 1 x prod(old) x D table interpolated to the grid `new`."""
    mode = mode or ("bicubic" if len(old) == 2 else "trilinear")
    grid = table.reshape(1, *old, table.shape[-1]).movedim(-1, 1)
    grid = F.interpolate(grid, size=new, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return grid.movedim(1, -1).reshape(1, math.prod(new), table.shape[-1])


def test_every_tiny_model_has_a_size_check():
    assert sorted(SIZES) == TINY


@pytest.mark.parametrize("name", TINY)
def test_other_input_sizes_equal_the_model_configured_for_them(name):
    """Model A (configured at S) on an S2-sized input equals model B configured at S2 that has A's weights and
    A's position tables resampled to S2's grid. That proves A resamples exactly so at S2, that nothing else in
    A depends on the configured size (frontends, padding, windows, masks, groups), and that B uses its own
    tables unchanged at its configured size (identity)."""
    spec = SIZES[name]
    torch.manual_seed(0)
    a = create_model(name, **spec.get("fixed", {})).eval()
    b = create_model(name, **spec.get("fixed", {}), **spec["config"]).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert {k for k in sa if sa[k].shape != sb[k].shape} == set(spec["tables"])  # the only size-dependent tensors
    tables = {k: resample(sa[k], *grids) for k, grids in spec["tables"].items()}
    b.load_state_dict({**sa, **tables})
    audio, video = inputs(**spec["input"])
    with torch.no_grad():
        out_a, out_b = a(audio=audio, video=video), b(audio=audio, video=video)
        assert out_a.keys() == out_b.keys()
        for k in out_a:
            torch.testing.assert_close(out_a[k], out_b[k], msg=k)
        if tables:  # not vacuous: the tables reach the outputs, another resampling gives other outputs
            b.load_state_dict({**sa, **{k: resample(sa[k], *g, mode="nearest") for k, g in spec["tables"].items()}})
            nearest = b(audio=audio, video=video)
            assert any(not torch.allclose(out_a[k], nearest[k], atol=1e-4) for k in out_a)


# -- activation checkpointing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", _cases(with_maskings=False))
def test_activation_checkpointing_runs_and_changes_nothing(name, kwargs, checkpoint_calls):
    """grad_checkpointing=True calls torch.utils.checkpoint in training (and only then) with the same outputs and
    gradients as without it; in eval mode or under no_grad it is not called (nothing to save)."""
    torch.manual_seed(0)
    plain = create_model(name, **kwargs).train()
    ckpt = create_model(name, grad_checkpointing=True, **kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    audio, video = inputs()

    def run(model):
        torch.manual_seed(1)  # the same SpecAugment / noise draws in both runs
        out = model(audio=audio, video=video)
        _loss(out).backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run(plain)
    assert not checkpoint_calls
    ckpt_out, ckpt_grads = run(ckpt)
    assert len(checkpoint_calls) > 0, "grad_checkpointing=True never called torch.utils.checkpoint"
    for k in out:
        torch.testing.assert_close(ckpt_out[k], out[k], msg=k)
    assert ckpt_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(ckpt_grads[n], grads[n], msg=n)
    checkpoint_calls.clear()
    ckpt.eval()(audio=audio, video=video)
    with torch.no_grad():
        ckpt.train()(audio=audio, video=video)
    assert not checkpoint_calls


# -- weight decay ----------------------------------------------------------------------------------------------
def _free_tensors(model: nn.Module) -> set[str]:
    """Parameters that are no layer's weight or bias, with 2+ dims: position tables, latents, queries, tokens,
    relative-position biases. (1-D parameters, biases and norms, skip weight decay by their shape.)"""
    layers = (nn.Linear, nn.modules.conv._ConvNd)
    free = set()
    for n, p in model.named_parameters():
        owner = model.get_submodule(n.rpartition(".")[0])
        if p.ndim >= 2 and not isinstance(owner, layers):
            free.add(n)
    return free


@pytest.mark.parametrize("name,kwargs", _cases())
def test_no_weight_decay_names_exist_and_cover_every_free_tensor(name, kwargs):
    """The optimiser matches no_weight_decay() names exactly (tasks/base.py param_groups, timm's
    param_groups_weight_decay): each must be a parameter, and every free tensor must be one of them."""
    model = create_model(name, **kwargs)
    names = model.no_weight_decay()
    assert names <= {n for n, _ in model.named_parameters()}, names - {n for n, _ in model.named_parameters()}
    free = _free_tensors(model)
    assert free, "a backbone without position tables or latents?"
    assert names == free, f"missing {sorted(free - names)}, not free {sorted(names - free)}"
