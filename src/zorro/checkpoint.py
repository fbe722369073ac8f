"""Reading a train.py checkpoint: what it holds (the run's resolved config, the dataset's classes), the one
`upgrade_checkpoint` that brings a checkpoint of an earlier layout to the current one, and `rebuild_config`, the
one way a run is rebuilt from a checkpoint (evaluate.py, zorro.eval.predict, the linear probe and a resumed
train.py): the checkpoint's config plus explicit overrides."""

from __future__ import annotations

import copy
import dataclasses
from typing import Collection, Iterable, NamedTuple, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .data.info import DatasetInfo
from .errors import ConfigError
from .models import upgrade_state_dict
from .models.pretrained import reorder_optimizer_state


def upgrade_checkpoint(ckpt: dict, model_keys: Iterable[str] | None = None,
                       param_groups: Sequence[Sequence[str]] | None = None) -> dict:
    """`ckpt` in the current layout (timm's checkpoint_filter_fn): every checkpoint-compatibility shim is here, and
    every reader goes through it (load_checkpoint, checkpoint_run, BaseTask.load_state_dict: Lightning's restore,
    evaluate.py, predict, the probe). A new dict (`ckpt` is not changed); applying it twice changes nothing.

    - the run config and dataset kept as top-level `zorro_config` / `zorro_dataset`: moved into the hyper-parameters
      (`config`, `dataset`), where BaseTask's save_hyperparameters keeps them;
    - `optimizer.lr_reference_batch` in the run config: the task's setting `task.lr_reference_batch`;
    - with `model_keys` (the state-dict keys of the task that loads it): the state dict in the current names
      (models.upgrade_state_dict: the input modules' earlier names, the unbuilt fusion copies left out);
    - with `param_groups` too (the names in each of the task's optimizer param groups, in order): a saved optimizer
      state whose parameters were renamed follows its parameters' names (Adam's moments stay with their tensors:
      the renamed tensors also moved in the parameter order)."""
    ckpt = dict(ckpt)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    for old, new in (("zorro_config", "config"), ("zorro_dataset", "dataset")):
        if old in ckpt:
            value = ckpt.pop(old)
            hparams.setdefault(new, value)
    config = hparams.get("config")
    if isinstance(config, dict) and "lr_reference_batch" in (config.get("optimizer") or {}):
        config = copy.deepcopy(config)
        reference = config["optimizer"].pop("lr_reference_batch")
        task = config.setdefault("task", {})
        if task.get("lr_reference_batch") is None:
            task["lr_reference_batch"] = reference
        hparams["config"] = config
    if hparams or "hyper_parameters" in ckpt:
        ckpt["hyper_parameters"] = hparams
    if model_keys is not None and "state_dict" in ckpt:
        saved = list(ckpt["state_dict"])
        ckpt["state_dict"] = state = upgrade_state_dict(ckpt["state_dict"], model_keys)
        if param_groups is not None and ckpt.get("optimizer_states") and \
                [k for k in saved if k in state] != list(state):  # renamed, not only copies left out
            position = {k: i for i, k in enumerate(state)}  # the saved order, in the current names
            saved_groups = [sorted(names, key=position.__getitem__) for names in param_groups]
            try:
                ckpt["optimizer_states"] = [reorder_optimizer_state(s, saved_groups, param_groups)
                                            for s in ckpt["optimizer_states"]]
            except (KeyError, ValueError) as e:
                raise ConfigError(f"the checkpoint's optimizer state does not fit this run's parameter groups ({e}); "
                                  "start a new run from its weights with init_from=<checkpoint> instead") from None
    return ckpt


def checkpoint_run(ckpt: dict) -> tuple[dict, DatasetInfo | None]:
    """(resolved run config, dataset info) saved in a train.py checkpoint (upgraded: any layout)."""
    hparams = upgrade_checkpoint(ckpt).get("hyper_parameters") or {}
    config, dataset = hparams.get("config"), hparams.get("dataset")
    if config is None:
        raise ValueError("the checkpoint has no saved run config; was it written by train.py?")
    return dict(config), as_dataset_info(dataset)


def as_dataset_info(dataset) -> DatasetInfo | None:
    """A DatasetInfo from one or its dict (as checkpoints keep it: plain values survive code moves)."""
    if dataset is None or isinstance(dataset, DatasetInfo):
        return dataset
    dataset = dict(dataset)
    return DatasetInfo(**{**dataset, "class_names": tuple(dataset.get("class_names", ()))})


def dataset_dict(dataset) -> dict | None:
    """The plain dict a checkpoint's hyper-parameters keep of a DatasetInfo (lists, not tuples: YAML-safe)."""
    info = as_dataset_info(dataset)
    return None if info is None else {**dataclasses.asdict(info), "class_names": list(info.class_names)}


def load_checkpoint(path, mmap: bool = False) -> tuple[dict, DictConfig]:
    """(checkpoint upgraded, its run config) of a train.py checkpoint; a one-line ConfigError for a bad path or
    file. mmap: tensors memory-mapped, read when used (to read the config of a checkpoint that Lightning loads
    again)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"ckpt_path: no such file {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"ckpt_path: {path} is a directory, not a checkpoint file") from None
    except Exception as e:  # a truncated or foreign file: torch/pickle raise many kinds
        raise ConfigError(f"ckpt_path: cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from None
    try:
        ckpt = upgrade_checkpoint(ckpt)
        return ckpt, OmegaConf.create(checkpoint_run(ckpt)[0])
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"ckpt_path: {path}: {e}") from None


# Groups that describe what the model was trained on: choosing the same loader keeps the checkpoint's settings.
TRAINED_ON = ("data",)


class Rebuilt(NamedTuple):
    config: DictConfig   # the config that rebuilds the run
    applied: list[str]   # the overrides it applied
    ignored: list[str]   # the group overrides it did not apply (their values are in the checkpoint's config)
    kept: list[str]      # the group choices that named the checkpoint's own target (its config kept)


def rebuild_config(saved: dict | DictConfig, overrides: Sequence[str] = (), composed: DictConfig | None = None,
                   own: Sequence[str] = (), command_keys: Collection[str] = ()) -> Rebuilt:
    """The config that rebuilds a checkpoint's run: `saved` (its run config, e.g. from load_checkpoint), with

    - the `own` keys taken from `composed` (this command's config: where it writes, what it logs; null where it
      has none) and the run's initialisations (pretrained, init_from) dropped: the checkpoint's weights replace them;
    - the explicit `overrides` on top, in Hydra's override grammar (train.py and evaluate.py pass their command
      line; outside Hydra's app the caller passes them):
        key=value, +key=value  the value as `composed` holds it (its interpolations resolve in the rebuilt config,
                               e.g. against the checkpoint's model), or as written where there is no `composed`;
        ~key                   removed;
        group=option           the group's config as `composed` holds it replaces the checkpoint's (unset values left
                               to the target; `trainer=gpu` resumes on the GPU); except `data=...` naming the loader
                               the checkpoint was trained with: its data config (the sampling the model learned
                               with) is kept and only key=value overrides change it (`data=shards data.root=DIR`
                               reads other shards exactly as trained);
        a group that composes into other keys (experiment=, debug=, masking=): not applied, returned as ignored
                               (the checkpoint's config holds its values; key=value changes one);
      overrides of `own` keys, of `command_keys` (the command's settings, not the run's) and of ckpt_path are the
      command's and are not applied.
    """
    run = OmegaConf.create(OmegaConf.to_container(saved, resolve=False) if OmegaConf.is_config(saved) else saved)
    skip = {*own, *command_keys, "ckpt_path"}
    with open_dict(run):
        for key in own:
            run[key] = composed._get_node(key) if composed is not None and key in composed else None
        if "paths" in own and "trainer" in run:
            run.trainer.default_root_dir = "${paths.output_dir}"  # saved resolved: the original run's folder
        run.pretrained = run.init_from = None
        applied, ignored, kept = [], [], []
        parsed = [(o, p, _is_group_choice(p, composed)) for o, p in _parse(overrides)]
        for override, p, group in sorted(parsed, key=lambda x: not x[2]):  # group choices first, then values
            key = p.key_or_group
            if key.split(".")[0] in skip or key.startswith("hydra"):
                continue
            if p.is_delete():
                _delete(run, key)
            elif group:
                node = composed._get_node(key)
                if key in TRAINED_ON and isinstance(run.get(key), DictConfig) and \
                        run[key].get("_target_") == node.get("_target_"):
                    kept.append(override)
                    continue
                run[key] = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items() if v is not None}
            elif p.package or composed is not None and "." not in key and key not in composed:
                ignored.append(override)  # a group that composes into other keys (experiment, debug, masking)
                continue
            else:
                OmegaConf.update(run, key, _raw(composed, key, p), merge=False, force_add=True)
            applied.append(override)
    return Rebuilt(run, applied, ignored, kept)


def describe(rebuilt: Rebuilt) -> str:
    """What a rebuild took from the command line, for the line that announces it."""
    parts = []
    if rebuilt.applied:
        parts.append(f"from the command line: {' '.join(rebuilt.applied)}")
    if rebuilt.kept:
        parts.append(f"the checkpoint's own config kept for {' '.join(rebuilt.kept)} (the same target; give "
                     "key=value to change a value)")
    if rebuilt.ignored:
        parts.append(f"ignored (they compose a new config; give key=value to change a value): "
                     f"{' '.join(rebuilt.ignored)}")
    return "".join(f"; {p}" for p in parts)


def _parse(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    return list(zip(overrides, OverridesParser.create().parse_overrides(overrides)))


def _is_group_choice(parsed, composed: DictConfig | None) -> bool:
    """`data=shards`: a top-level key whose composed value is a config while the override gives a name."""
    key = parsed.key_or_group
    return (composed is not None and not parsed.is_delete() and not parsed.package and "." not in key
            and key in composed and isinstance(composed._get_node(key), DictConfig)
            and isinstance(parsed.value(), str))


def _raw(composed: DictConfig | None, key: str, parsed):
    """The value of `key` in `composed`, interpolations kept; the override's own value without one."""
    if composed is None:
        return parsed.value()
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(composed, parent_key) if parent_key else composed
    if not isinstance(parent, (DictConfig, ListConfig)) or leaf not in parent:
        return parsed.value()
    node = parent._get_node(leaf)
    return node if isinstance(node, (DictConfig, ListConfig)) else node._value()


def _delete(run: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    node = OmegaConf.select(run, parent_key) if parent_key else run
    if isinstance(node, DictConfig) and leaf in node:
        node.pop(leaf)
