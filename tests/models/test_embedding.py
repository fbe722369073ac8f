"""The one input module (embedding.InputEmbed) every backbone embeds through, and the upgrade of state dicts that
name its tensors in the per-backbone layouts that came before it (pretrained.upgrade_state_dict)."""

import pytest
import torch
from torch import nn

from zorro.models import MODELS, InputEmbed, upgrade_state_dict
from zorro.models.embedding import input_module_key

from .helpers import inputs

TINY = sorted(n for n in MODELS if n.endswith("_tiny"))

# The earlier layout, written out per backbone (not derived from the table under test): InputEmbed's name prefix ->
# the name the same tensor had. Keys are matched longest prefix first.
OLD_LAYOUT = {
    "zorro_vit_tiny": {"{m}_embed.patch.": "{m}_embed.", "{m}_embed.pos": "{m}_pos",
                       "{m}_embed.frontend.": "{m}_frontend."},
    "zorro_hip_tiny": {"{m}_embed.patch.": "{m}_embed.", "{m}_embed.pos": "{m}_pos",
                       "{m}_embed.fourier.": "{m}_fourier.", "{m}_embed.frontend.": "{m}_frontend."},
    "mbt_tiny": {"{m}_embed.patch.": "{m}.patch_embed.", "{m}_embed.pos": "{m}.pos_embed",
                 "{m}_embed.frontend.": "{m}_frontend."},
    "zorro_swin_tiny": {"{m}_embed.patch.": "{m}.patch_embed.", "{m}_embed.frontend.": "{m}_frontend."},
    "cav_mae_tiny": {"{m}_embed.patch.": "patch_embed_{s}.", "{m}_embed.type_embed": "modality_{s}"},
}


def old_layout(name: str, state: dict) -> dict:
    prefixes = {}
    for m in ("audio", "video"):
        prefixes.update({new.format(m=m): old.format(m=m, s=m[0]) for new, old in OLD_LAYOUT[name].items()})
    out = {}
    for key, value in state.items():
        new = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p)), None)
        out[key if new is None else prefixes[new] + key[len(new):]] = value
    return out


def perturbed(model: nn.Module) -> nn.Module:
    """Every tensor moved off its initialisation, so a tensor loaded into the wrong place changes the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", TINY)
def test_every_backbone_embeds_through_the_one_input_module(name):
    model = MODELS[name]()
    assert isinstance(model.audio_embed, InputEmbed) and isinstance(model.video_embed, InputEmbed)
    embeds = [n for n, m in model.named_modules() if isinstance(m, InputEmbed)]
    assert embeds == ["audio_embed", "video_embed"]
    # every patch convolution and front end lives inside them
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convs and all(n.startswith(("audio_embed.patch.", "video_embed.patch.")) for n in convs), convs


@pytest.mark.parametrize("name", TINY)
def test_an_old_layout_state_dict_loads_strictly_through_the_upgrade(name):
    torch.manual_seed(0)
    source = perturbed(MODELS[name]()).eval()
    old = old_layout(name, source.state_dict())
    assert set(old) != set(source.state_dict())  # the layouts differ
    torch.manual_seed(1)
    target = MODELS[name]().eval()
    upgraded = upgrade_state_dict(old, target.state_dict().keys())
    assert list(upgraded) == [input_module_key(k) for k in old]  # the order kept
    target.load_state_dict(upgraded, strict=True)
    frames = 1 if name == "cav_mae_tiny" else 4
    audio, video = inputs(frames=frames)
    with torch.no_grad():
        ours, theirs = target(audio=audio, video=video), source(audio=audio, video=video)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # a task's state dict (`backbone.` prefix) too, and a current state dict passes unchanged
    task_keys = [f"backbone.{k}" for k in target.state_dict()]
    assert list(upgrade_state_dict({f"backbone.{k}": v for k, v in old.items()}, task_keys)) == task_keys
    assert list(upgrade_state_dict(target.state_dict(), target.state_dict().keys())) == list(target.state_dict())


def test_init_from_an_old_layout_checkpoint_reads_the_input_modules(tmp_path):
    """`init_from` reads the backbone's tensors through load_into, which names input modules as InputEmbed does."""
    from zorro.run import init_backbone

    torch.manual_seed(0)
    source = perturbed(MODELS["zorro_hip_tiny"]())
    old = old_layout("zorro_hip_tiny", source.state_dict())
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in old.items()}}, tmp_path / "old.ckpt")
    target = MODELS["zorro_hip_tiny"]()
    report = init_backbone(target, str(tmp_path / "old.ckpt"))
    assert not report.missing and not report.unexpected and not report.mismatched
    assert report.sources["audio_embed.fourier.weight"] == "backbone.audio_fourier.weight"
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_unbuilt_fusion_copies_are_left_out_and_the_input_is_not_modified():
    model = MODELS["zorro_vit_tiny"](masking="two_streams", separate_weights=True)
    state = model.state_dict()
    old = dict(state)
    old["blocks.0.mlp.parts.fusion.fc1.weight"] = old["blocks.0.mlp.parts.audio.fc1.weight"].clone()
    upgraded = upgrade_state_dict(old, state.keys())
    assert list(upgraded) == list(state) and "blocks.0.mlp.parts.fusion.fc1.weight" in old


def test_the_input_module_names_of_every_layout():
    assert input_module_key("audio_pos") == "audio_embed.pos"
    assert input_module_key("backbone.video_embed.proj.weight") == "backbone.video_embed.patch.proj.weight"
    assert input_module_key("audio.patch_embed.norm.bias") == "audio_embed.patch.norm.bias"
    assert input_module_key("video.pos_embed") == "video_embed.pos"
    assert input_module_key("modality_v") == "video_embed.type_embed"
    assert input_module_key("pos_embed_a") == "audio_embed.pos"
    for unchanged in ("decoder_pos_embed_a", "decoder_modality_v", "audio.cls_token", "audio_embed.pos",
                      "video_embed.patch.proj.weight", "audio_embed.frontend.mel_scale.fb", "pos_embed"):
        assert input_module_key(unchanged) == unchanged


@pytest.mark.parametrize("name", ["zorro_vit_tiny", "zorro_hip_tiny", "mbt_tiny"])
def test_a_longer_input_resamples_the_position_table(name):
    """Positions of the configured grid, resampled to the input's grid: the module gives the same tokens as its
    parts applied by hand."""
    from zorro.models.layers import resample_pos_embed

    torch.manual_seed(0)
    embed = MODELS[name]().eval().audio_embed
    audio, _ = inputs(seconds=2.56)
    with torch.no_grad():
        spec = embed.inputs(audio, None, 2)
        tokens = embed.tokens(spec)
        grid = (embed.grid[0], spec.shape[-1] // embed.patch_size)
        assert grid[1] == 2 * embed.grid[1] and tokens.shape[1] == grid[0] * grid[1]
        expected = embed.patch(spec)
        if embed.fourier is not None:
            from zorro.models.embedding import fourier_features

            expected = expected + embed.fourier(fourier_features(grid, embed.grid, embed.fourier_bands))
        expected = expected + resample_pos_embed(embed.pos, embed.grid, grid)
    torch.testing.assert_close(tokens, expected)


def test_a_saved_optimizer_state_follows_the_parameter_names():
    """The renamed parameters moved in the parameter order: reorder_optimizer_state gives every parameter the
    Adam moments it was saved with, whatever order the saved param groups listed them in."""
    from zorro.models.pretrained import reorder_optimizer_state

    torch.manual_seed(0)
    named = dict(MODELS["zorro_hip_tiny"]().named_parameters())
    new_groups = [[n for n, p in named.items() if p.ndim > 1], [n for n, p in named.items() if p.ndim <= 1]]
    old_groups = [g[1::2] + g[::2] for g in new_groups]  # another order, in the same groups
    saved = torch.optim.AdamW([{"params": [named[n] for n in g]} for g in old_groups])
    sum((p * torch.randn_like(p)).sum() for p in named.values()).backward()
    saved.step()
    restored = torch.optim.AdamW([{"params": [named[n] for n in g]} for g in new_groups])
    restored.load_state_dict(reorder_optimizer_state(saved.state_dict(), old_groups, new_groups))
    for p in named.values():
        assert torch.equal(restored.state[p]["exp_avg_sq"], saved.state[p]["exp_avg_sq"])
    naive = torch.optim.AdamW([{"params": [named[n] for n in g]} for g in new_groups])
    naive.load_state_dict(saved.state_dict())  # what loading it as saved would do
    assert any(not torch.equal(naive.state[p]["exp_avg_sq"], saved.state[p]["exp_avg_sq"]) for p in named.values())
