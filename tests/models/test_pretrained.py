import pytest
import timm
import torch

from zorro.config import ConfigError
from zorro.models import cav_mae_tiny, zorro_vit_tiny
from zorro.models.pretrained import load_into, load_state
from zorro.run import init_backbone


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=4, num_heads=4)
    path = tmp_path_factory.mktemp("weights") / "vit.pth"
    torch.save(vit.state_dict(), path)
    return vit, path


@pytest.mark.parametrize("separate", [False, True])
def test_imagenet_vit_into_zorro_vit(vit_file, separate):
    vit, path = vit_file
    model = zorro_vit_tiny(separate_weights=separate)
    report = model.load_pretrained(path)
    copies = [model.blocks[2].attn.qkv.parts[g] for g in ("audio", "fusion", "video")] if separate else \
        [model.blocks[2].attn.qkv.shared]
    for qkv in copies:
        torch.testing.assert_close(qkv.weight, vit.blocks[2].attn.qkv.weight)
    # 14 x 14 ImageNet positions -> the 4 x 4 frame grid, the same for every frame
    frames = model.video_embed.pos.reshape(4, 16, -1)
    torch.testing.assert_close(frames[0], frames[3])
    assert "fusion_latents" in report.missing and not report.mismatched
    assert "cls_token" in report.unexpected  # Zorro has no class token: reported, not silently dropped


def test_mismatched_shapes_are_reported_not_loaded(vit_file):
    _, path = vit_file
    model = zorro_vit_tiny(dim=32, num_heads=4)
    before = model.blocks[0].mlp.shared.fc1.weight.clone()
    report = model.load_pretrained(path)
    assert torch.equal(model.blocks[0].mlp.shared.fc1.weight, before)
    assert any(k == "blocks.0.mlp.shared.fc1.weight" for k, *_ in report.mismatched)


def test_relative_position_bias_table_is_resized():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32, depths=(1,), num_heads=(2,))
    small = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32, depths=(1,),
                              num_heads=(2,), window_size=4, img_size=64)
    report = load_into(small, swin.state_dict())
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert any(k == key for k, *_ in report.resized)
    assert small.state_dict()[key].shape == (49, 2)


def test_load_state_needs_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_state(tmp_path / "missing.pth")
    torch.save({"a": 1}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_state(tmp_path / "bad.pth")


def test_a_model_tensor_written_twice_is_an_error(vit_file):
    _, path = vit_file
    model = zorro_vit_tiny()
    state = load_state(path)
    with pytest.raises(ValueError, match="both map to 'video_embed.pos'"):
        load_into(model, {"pos_embed": state["pos_embed"], "other": state["pos_embed"]},
                  rename=lambda key: "video_embed.pos", pos_grids={"video_embed.pos": (4, 4, 4)})


@pytest.mark.parametrize("build", [zorro_vit_tiny, cav_mae_tiny])
def test_init_from_a_file_that_does_not_fit_is_a_one_line_error(tmp_path, build):
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3), "classifier.bias": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="none of the 2 tensors of .*other.pth fits") as error:
        init_backbone(build(), str(tmp_path / "other.pth"))
    assert "\n" not in str(error.value)


def test_init_from_a_train_checkpoint_loads_the_backbone_and_names_the_rest(tmp_path):
    source = cav_mae_tiny()
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in source.state_dict().items()},
                               "heads.global.weight": torch.zeros(3, 64)}}, tmp_path / "run.ckpt")
    report = init_backbone(cav_mae_tiny(), str(tmp_path / "run.ckpt"))
    assert not report.missing and report.unexpected == ["heads.global.weight"]
    assert "heads" in report.reasons["heads.global.weight"]
@pytest.mark.parametrize("factory,seconds", [("zorro_vit_tiny", 2.56), ("zorro_vit_tiny", 0.64), ("zorro_hip_tiny", 2.56),
                                             ("mbt_tiny", 0.64)])  # longer and shorter than the checkpoint's 1.28 s
def test_init_from_another_audio_length_resamples_the_audio_positions_along_time(factory, seconds, tmp_path):
    """Fine-tuning from a checkpoint of another audio length (S2's 5.12 s -> AS-500k's 8 s or K400's 2.56 s):
    `init_from` resamples the audio position table along time by value, the function the model applies to a
    longer input, instead of keeping its initialisation."""
    from zorro import models
    from zorro.models.layers import resample_pos_embed
    from zorro.run import init_backbone

    torch.manual_seed(0)
    source = getattr(models, factory)()  # 1.28 s
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "pre.ckpt")
    target = getattr(models, factory)(audio_seconds=seconds)
    report = init_backbone(target, str(tmp_path / "pre.ckpt"))
    (key, (grid, axis)), = [(k, t) for k, t in target.position_tables().items() if k.startswith("audio")]
    old_grid = list(grid)
    old_grid[axis] = source.position_tables()[key][0][axis]
    table = target.state_dict()[key]
    assert old_grid != list(grid) and not report.mismatched and key not in report.missing
    assert any(k == key for k, *_ in report.resized)
    torch.testing.assert_close(table, resample_pos_embed(source.state_dict()[key], old_grid, grid))
    video = [k for k in target.position_tables() if k.startswith("video")][0]
    torch.testing.assert_close(target.state_dict()[video], source.state_dict()[video])  # same frames: copied
    if factory == "zorro_vit_tiny":  # the fine-tuned model starts where the pre-trained one is on this length
        from .helpers import inputs

        audio, _ = inputs()
        audio = audio.repeat(1, 2)[:, : round(seconds * 16_000)]  # the target's length
        with torch.no_grad():
            ours, pretrained = target.eval().audio_embed(audio, None, 2), source.eval().audio_embed(audio, None, 2)
        torch.testing.assert_close(ours, pretrained)
