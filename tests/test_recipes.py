"""Every command of docs/recipes.md composes (each value of a `-m` sweep), passes the config checks, and its model and
task build at the tiny size; and the recipes do what the papers say (MBT, ESC-50, AudioSet-2M)."""

import itertools
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from zorro.config import ConfigError, check_config
from zorro.data.info import DatasetInfo

from .conftest import CONF, ROOT, compose_cfg

DOC = ROOT / "docs" / "recipes.md"


def doc_rows() -> list[tuple[str, str]]:
    """(paper row, command) of every table row whose command cell is `python train.py ...`."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`python train.py"):
            rows.append((cells[0], cells[1].strip("`")))
    return rows


def sweep(command: str) -> list[list[str]]:
    """The override lists a command runs: `-m key=a,b` expands to one list per value (commas inside [] stay)."""
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"], command
    args = [a for a in args[2:] if a not in ("-m", "--multirun")]
    choices = []
    for arg in args:
        key, _, value = arg.partition("=")
        if "," in value and not value.startswith("["):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([arg])
    return [list(c) for c in itertools.product(*choices)]


def compose_with_choices(overrides, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


ROWS = doc_rows()


def test_the_doc_has_a_command_for_every_table():
    names = " ".join(row for row, _ in ROWS)
    for table in ("Table 1", "Table 2", "Table 3", "Appendix C", "Section 4.4", "MBT"):
        assert table in names
    assert len(ROWS) >= 40


@pytest.mark.parametrize("row,command", ROWS, ids=[r for r, _ in ROWS])
def test_every_recipe_command_composes(row, command, tmp_path):
    for overrides in sweep(command):
        cfg, choices = compose_with_choices(overrides, tmp_path)
        check_config(cfg)  # no ??? left, no unknown keys, scalar types right
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        # the same recipe at the tiny size: the experiment's model settings must fit the model they are for
        tiny = f"{choices['model'].removesuffix('_tiny')}_tiny"
        if not (CONF / "model" / f"{tiny}.yaml").exists():
            continue
        small, _ = compose_with_choices([*[o for o in overrides if not o.startswith("model=")], f"model={tiny}"],
                                        tmp_path)
        check_config(small)
        if small.model.get("fusion_level", 0) >= small.model.get("depth", 1 << 30):  # appendix C's layers 6, 9
            small.model.depth = small.model.fusion_level + 1
        backbone = instantiate(small.model)
        task = instantiate(small.task, backbone=backbone, dataset=DatasetInfo(num_classes=3, multi_label=True),
                           optimizer=instantiate(small.optimizer),
                           scheduler=instantiate(small.scheduler) if small.get("scheduler") else None)
        assert task.backbone is backbone


def test_sweeps_expand_and_lists_stay_whole():
    runs = sweep("python train.py -m experiment=x model.fusion_level=0,3 tags=[a,b] '~model.y'")
    assert runs == [["experiment=x", "model.fusion_level=0", "tags=[a,b]", "~model.y"],
                    ["experiment=x", "model.fusion_level=3", "tags=[a,b]", "~model.y"]]


# -- what the recipes say, checked against the papers -------------------------------------------------------------
def recipe(name, *extra, tmp_path):
    cfg = compose_cfg(overrides=[f"experiment={name}", "data.root=/data", "init_from=/ckpt", "pretrained=/w", *extra],
                      output_dir=tmp_path)
    check_config(cfg)
    return cfg


def test_mbt_recipe_is_mbts(tmp_path):
    cfg = recipe("mbt_as500k", tmp_path=tmp_path)
    # t = 8 s: 8 frames spanning the same 8 s as the 8 s of audio each view gets
    assert cfg.model.audio_seconds == cfg.data.audio_seconds == 8.0
    assert cfg.data.num_frames / cfg.data.frame_rate == 8.0
    assert cfg.data.audio_align == "window_centre"
    # SGD lr 0.5 momentum 0.9 at batch 64, 2.5 warm-up epochs of 50, 4 test crops
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.lr == 0.5 and cfg.task.lr_reference_batch == cfg.data.batch_size == 64
    assert cfg.scheduler.warmup_fraction * cfg.trainer.max_epochs == pytest.approx(2.5)
    assert cfg.data.eval_windows * cfg.data.eval_crops == 4
    # mixup 0.3 + modality mixup; one classifier, logits averaged; SpecAugment as AST; IN-21k weights required
    assert cfg.task.mixup_alpha == 0.3 and cfg.task.modality_mixup
    assert cfg.task.shared_head and cfg.task.combine == "logits"
    assert (cfg.model.freq_mask, cfg.model.time_mask, cfg.model.num_masks, cfg.model.freq_jitter) == (48, 192, 1, 0)
    assert cfg.model.drop_path_rate == 0.3 and cfg.model.window == "hamming"
    with pytest.raises(ConfigError, match="missing value for pretrained"):
        check_config(compose_cfg(overrides=["experiment=mbt_as500k", "data.root=/data"], output_dir=tmp_path))


def test_esc50_is_a_fine_tuning_recipe_at_the_pretraining_length(tmp_path):
    cfg = recipe("esc50", tmp_path=tmp_path)
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.data.eval_windows == cfg.data.eval_crops == 1
    assert cfg.model.audio_seconds == cfg.data.audio_seconds > 5.0  # longer than the 5 s clips: they are looped
    pre = recipe("acav_contrastive", tmp_path=tmp_path)  # the pre-training the recipe fine-tunes
    assert (pre.model.audio_seconds, pre.data.frame_rate) == (cfg.model.audio_seconds, cfg.data.frame_rate)
    with pytest.raises(ConfigError, match="missing value for init_from"):
        check_config(compose_cfg(overrides=["experiment=esc50", "data.root=/d"], output_dir=tmp_path))
    scratch = compose_cfg(overrides=["experiment=esc50_scratch", "data.root=/d"], output_dir=tmp_path)
    check_config(scratch)
    assert scratch.init_from is None


@pytest.mark.parametrize("name", ["as2m_zorro_vit", "as2m_two_streams", "as2m_input_level", "as2m_bottleneck",
                                  "as2m_zorro_swin", "as2m_zorro_hip", "as2m_fusion_level"])
def test_audioset_2m_recipes_decay_weights_and_scale_the_lr(name, tmp_path):
    cfg = recipe(name, tmp_path=tmp_path)
    assert cfg.optimizer.weight_decay > 0 and cfg.task.lr_reference_batch


@pytest.mark.parametrize("name", ["k400", "k400_video", "mbt_k400", "mbt_k400_video"])
def test_kinetics_recipes_test_the_last_epoch_not_the_best_on_the_split_they_report(name, tmp_path):
    cfg = recipe(name, tmp_path=tmp_path)
    assert cfg.data.test_split == "val"  # the paper's Kinetics-400 numbers are on the validation set
    assert cfg.trainer.limit_val_batches == 0 and cfg.callbacks.model_checkpoint.monitor is None
    if name.startswith("mbt"):
        assert cfg.task.loss_reduction == "sum_classes" and cfg.trainer.gradient_clip_val == 1.0
    if name.endswith("video"):
        assert list(cfg.data.modalities) == ["video"] and list(cfg.task.eval_inputs) == ["video"]


def test_zorro_recipes_scale_the_specaugment_time_mask_with_their_audio_length(tmp_path):
    """conf/model/zorro_*.yaml: AST's masks (48 of 128 bins, 192 of 1024 frames) halved for two masks and scaled to the
    input; a recipe that changes audio_seconds sets time_mask with it."""
    checked = 0
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = compose_cfg(overrides=[f"experiment={path.stem}"], output_dir=tmp_path)  # values left unset: fine here
        if not cfg.model._target_.startswith("zorro.models.zorro") and "ZorroViT" not in cfg.model._target_:
            continue
        m = cfg.model
        rule = (round(24 * m.n_mels / 128), round(96 * m.audio_seconds / 10.24))
        assert (m.freq_mask, m.time_mask) == rule, path.stem
        checked += 1
    assert checked >= 15


def test_zorro_hip_fine_tuning_rows_use_adam_with_weight_decay():
    hip = [command for _, command in ROWS if "model=zorro_hip" in command
           and any(f"experiment={e} " in command for e in ("as500k", "vggsound", "k400", "k400_video"))]
    assert len(hip) == 4 and all("optimizer=adamw" in c for c in hip)
