"""Early, one-line errors for bad configs: unknown keys, wrong scalar types and missing values are caught
before anything is built, instead of surfacing as a traceback from deep inside a constructor."""

from __future__ import annotations

import difflib
import inspect
import re
import typing

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    pass


# A recipe's required top-level value: `init_from: ${required:init_from}`. (`???` cannot do it there: merging `???`
# onto train.yaml's `init_from: null` keeps null.) check_config names it; the resolver fails if it is read unset.
REQUIRED = "${required:"


def _required(name: str):
    raise ConfigError(f"missing value for {name}: this recipe needs it (set it on the command line, e.g. {name}=...)")


if not OmegaConf.has_resolver("required"):
    OmegaConf.register_new_resolver("required", _required)


def path_safe(text: str, max_len: int = 120) -> str:
    """A sweep job's directory name from its overrides (train.yaml hydra.sweep.subdir), e.g. masking-zorro_tags-a+b:
    only characters that Hydra's override grammar reads as plain text, so the job's paths can be passed back on the
    command line (`evaluate.py ckpt_path=<sweep>/0_masking-zorro/checkpoints/last.ckpt`): list commas become `+`,
    brackets, quotes, `=` and `/` (which would nest directories) are dropped; long names are cut."""
    text = re.sub(r"[^A-Za-z0-9._+-]", "", str(text).replace(",", "+"))
    return text[:max_len].rstrip("._+-")


if not OmegaConf.has_resolver("path_safe"):
    OmegaConf.register_new_resolver("path_safe", path_safe)


# Keys a task reads from a group's config instead of passing them to its target.
TASK_KEYS = {("optimizer", "lr_reference_batch")}  # BaseTask: LR scaling with the global batch

_SCALARS = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _expected_types(annotation) -> tuple[type, ...] | None:
    """Accepted Python types for a plain scalar annotation (optionally `| None`); None = don't check."""
    args = typing.get_args(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SCALARS:
            return _SCALARS[rest[0]] + (type(None),)
    return None


def check_node(node: DictConfig, path: str) -> None:
    target = get_object(node._target_)
    supported = getattr(target, "maskings", None)  # Zorro backbones list the maskings they implement
    if supported is not None and node.get("masking") not in (None, *supported):
        raise ConfigError(f"{path}.masking: {target.__name__} implements {', '.join(supported)}; "
                          f"got {node.masking!r}")
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    for key in node:
        if str(key).startswith("_") or (path, key) in TASK_KEYS:
            continue
        if key not in params:
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{key}: {node._target_} has no parameter {key!r}{hint}")
        value = node._get_node(key)._value() if not OmegaConf.is_interpolation(node, key) else node[key]
        expected = _expected_types(hints.get(key))
        if expected and not OmegaConf.is_config(value):
            if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
                names = "/".join(t.__name__ for t in expected)
                raise ConfigError(f"{path}.{key}: expected {names}, got {value!r} ({type(value).__name__})")


def check_config(cfg: DictConfig, required: tuple[str, ...] = ()) -> None:
    unset = [str(k) for k in cfg if OmegaConf.is_interpolation(cfg, k)
             and str(cfg._get_node(k)._value()).startswith(REQUIRED)]
    probe = cfg.copy()
    for key in unset:  # missing_keys resolves them: keep the resolver out of it
        probe[key] = None
    missing = sorted(unset + sorted(OmegaConf.missing_keys(probe)))
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (set it on the command line, e.g. {missing[0]}=...)")
    for path in ("model", "data", "task", "optimizer", "scheduler", "trainer"):
        node = cfg.get(path)
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                check_node(node, path)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{path}._target_: cannot import {node._target_!r} ({e})") from None
