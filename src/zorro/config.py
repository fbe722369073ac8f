"""Early, one-line errors for bad configs: unknown keys, wrong scalar types and missing values are caught
before anything is built, instead of surfacing as a traceback from deep inside a constructor."""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import typing
from pathlib import Path

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError  # noqa: F401  (zorro.config.ConfigError: train.py, evaluate.py and users catch it)


# A recipe's required top-level value: `init_from: ${required:init_from}`. (`???` cannot do it there: merging `???`
# onto train.yaml's `init_from: null` keeps null.) check_config names it; the resolver fails if it is read unset.
REQUIRED = "${required:"


def _required(name: str):
    raise ConfigError(f"missing value for {name}: this recipe needs it (set it on the command line, e.g. {name}=...)")


if not OmegaConf.has_resolver("required"):
    OmegaConf.register_new_resolver("required", _required)


def path_safe(text: str) -> str:
    """Text as characters that Hydra's override grammar reads as plain text, so a job's paths can be passed back on
    the command line (`evaluate.py ckpt_path=<sweep>/0_masking-zorro/checkpoints/last.ckpt`): list commas become
    `+`; brackets, quotes, `=` and `/` (which would nest directories) are dropped."""
    return re.sub(r"[^A-Za-z0-9._+-]", "", str(text).replace(",", "+")).strip("._+-")


if not OmegaConf.has_resolver("path_safe"):
    OmegaConf.register_new_resolver("path_safe", path_safe)


def swept_keys(sweep_dir) -> set[str] | None:
    """The keys a sweep varies (`masking=zorro,two_streams` -> masking), from the arguments Hydra's sweeper saves in
    <sweep dir>/multirun.yaml before it launches a job; None where there is no such file (a sweeper that keeps none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(str(sweep_dir)) / "multirun.yaml"
    try:
        arguments = yaml.safe_load(path.read_text())["hydra"]["overrides"]["task"] or []
        parsed = OverridesParser.create().parse_overrides(list(arguments))
    except Exception:  # missing, unreadable or foreign: say "unknown"
        return None
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def job_overrides(overrides, sweep_dir=None, exclude=()) -> list[tuple[str, str]]:
    """(key, value) of the overrides that name a sweep's job: the swept keys only (the job's full overrides stay in
    its .hydra/overrides.yaml); all but `exclude` (paths) where the sweep's keys are unknown or none is swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    pairs = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override() or o.is_delete():
            continue
        pairs.append((o.key_or_group, o.input_line.split("=", 1)[1] if "=" in o.input_line else ""))
    swept = swept_keys(sweep_dir) if sweep_dir is not None else None
    chosen = [(k, v) for k, v in pairs if swept and k in swept]
    return chosen or [(k, v) for k, v in pairs if k not in set(exclude)]


def job_dirname(num, overrides, sweep_dir=None, exclude=(), max_len: int = 120) -> str:
    """A sweep job's directory (train.yaml hydra.sweep.subdir): its number, then its swept overrides as
    key-value, e.g. `3_masking-zorro_optimizer.lr-1e-3`. Whole items only: past max_len the remaining items are
    counted (`_and2more`), never cut in the middle, and the number keeps the name unique."""
    items = [f"{path_safe(k)}-{path_safe(v)}" for k, v in job_overrides(overrides, sweep_dir, exclude)]
    name, kept = str(num), 0
    for item in items:
        if kept and len(name) + 1 + len(item) > max_len:
            break
        name, kept = f"{name}_{item}", kept + 1
    return name if kept == len(items) else f"{name}_and{len(items) - kept}more"


def _job_dirname_resolver(*, _root_) -> str:
    hydra = _root_.hydra
    return job_dirname(hydra.job.num, hydra.overrides.task, hydra.sweep.dir,
                       hydra.job.config.override_dirname.exclude_keys)


if not OmegaConf.has_resolver("job_dirname"):
    OmegaConf.register_new_resolver("job_dirname", _job_dirname_resolver)


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


class Signature(typing.NamedTuple):
    """What check_node reads of a config group's target."""
    name: str                                  # for messages
    params: tuple[str, ...]
    expected: dict[str, tuple[type, ...]]     # parameter -> accepted scalar types (the checked ones only)
    var_keyword: bool                          # **kwargs: any key goes
    maskings: tuple[str, ...] | None | str     # Zorro backbones list the maskings they implement; UNKNOWN: unread


UNKNOWN = "unknown"


def imported_signature(target_path: str) -> Signature:
    target = get_object(target_path)
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    expected = {k: t for k in params if (t := _expected_types(hints.get(k)))}
    return Signature(target.__name__, tuple(params), expected,
                     any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()),
                     getattr(target, "maskings", None))


def check_node(node: DictConfig, path: str, signature: Signature | None = None) -> None:
    sig = signature or imported_signature(node._target_)
    if sig.maskings not in (None, UNKNOWN) and node.get("masking") not in (None, *sig.maskings):
        raise ConfigError(f"{path}.masking: {sig.name} implements {', '.join(sig.maskings)}; "
                          f"got {node.masking!r}")
    if sig.var_keyword:
        return
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in sig.params:
            close = difflib.get_close_matches(str(key), list(sig.params), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{key}: {node._target_} has no parameter {key!r}{hint}")
        try:
            value = node._get_node(key)._value() if not OmegaConf.is_interpolation(node, key) else node[key]
        except Exception:  # an interpolation only Hydra's app resolves (${hydra:...}): its type is not checked
            continue
        expected = sig.expected.get(key)
        if expected and not OmegaConf.is_config(value):
            if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
                names = "/".join(t.__name__ for t in expected)
                raise ConfigError(f"{path}.{key}: expected {names}, got {value!r} ({type(value).__name__})")


# -- the same signatures read from the targets' source files, without importing them ---------------------------------
# train.py checks the config before torch / Lightning are imported (10-20 s): a target's parameters and their
# scalar annotations are read with `ast` from its source; where that is not plain (no __init__ of its own, a name
# bound by an assignment, ...) nothing is concluded, and the check after the imports (check_config) decides.
_SOURCE_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _module_file(module: str) -> Path | None:
    """The source file of a module, found without importing it or its packages."""
    import importlib.util

    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    locations, found = [Path(p) for p in (spec.submodule_search_locations or [])], None
    for part in parts[1:]:
        found = next((c for loc in locations for c in (loc / part / "__init__.py", loc / f"{part}.py") if c.exists()),
                     None)
        if found is None:
            return None
        locations = [found.parent] if found.name == "__init__.py" else []
    return found


def _definition(module: str, name: str, depth: int = 0):
    """The ClassDef / FunctionDef that `module.name` is, following `from x import name` (also relative)."""
    import ast

    path = _module_file(module)
    if path is None or depth > 6:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    found = None
    for stmt in tree.body:  # the last top-level binding wins, as when the module runs
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef)) and stmt.name == name:
            found = stmt
        elif isinstance(stmt, ast.ImportFrom) and any((a.asname or a.name) == name for a in stmt.names):
            alias = next(a for a in stmt.names if (a.asname or a.name) == name)
            base = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(max(stmt.level - 1, 0)):
                base = base.rpartition(".")[0]
            source = (f"{base}.{stmt.module}" if stmt.module else base) if stmt.level else stmt.module
            found = ("import", source, alias.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.Import)) and name in {
                getattr(t, "id", None) for t in getattr(stmt, "targets", [getattr(stmt, "target", None)])} | {
                (a.asname or a.name) for a in getattr(stmt, "names", [])}:
            found = None  # bound by an assignment: not read
    if isinstance(found, tuple):
        return _definition(found[1], found[2], depth + 1)
    return found


def _source_expected(annotation) -> tuple[type, ...] | None:
    import ast

    if annotation is None:
        return None
    text = ast.unparse(annotation).strip("'\"")
    optional = re.fullmatch(r"(?:typing\.)?Optional\[(\w+)\]", text)
    parts = [optional.group(1), "None"] if optional else [p.strip() for p in text.split("|")]
    if len(parts) == 1 and parts[0] in _SOURCE_SCALARS:
        return _SCALARS[_SOURCE_SCALARS[parts[0]]]
    if len(parts) == 2 and "None" in parts:
        rest = next(p for p in parts if p != "None")
        if rest in _SOURCE_SCALARS:
            return _SCALARS[_SOURCE_SCALARS[rest]] + (type(None),)
    return None


def source_signature(target_path: str) -> Signature | None:
    """The target's Signature read from its source without importing it; None where that is not plain."""
    import ast

    module, _, name = target_path.rpartition(".")
    node = _definition(module, name) if module else None
    maskings = None
    if isinstance(node, ast.ClassDef):
        if node.decorator_list:  # dataclasses and the like make their own __init__
            return None
        for stmt in node.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and "maskings" in {
                    getattr(t, "id", None) for t in getattr(stmt, "targets", [getattr(stmt, "target", None)])}:
                try:
                    maskings = tuple(ast.literal_eval(stmt.value)) if stmt.value is not None else None
                except (ValueError, TypeError, SyntaxError):
                    maskings = UNKNOWN
        if maskings is None and any(not (isinstance(b, ast.Name) and b.id == "object") for b in node.bases):
            maskings = UNKNOWN  # perhaps inherited
        node = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        skip = 1  # self
    else:
        skip = 0
    if not isinstance(node, ast.FunctionDef):
        return None
    a = node.args
    arguments = [*a.posonlyargs, *a.args][skip:] + a.kwonlyargs
    expected = {x.arg: t for x in arguments if (t := _source_expected(x.annotation))}
    return Signature(name, tuple(x.arg for x in arguments), expected, a.kwarg is not None, maskings)


def check_values(cfg: DictConfig) -> None:
    """The checks that need no imports: every required (`???`, `${required:...}`) value is set."""
    unset = [str(k) for k in cfg if OmegaConf.is_interpolation(cfg, k)
             and str(cfg._get_node(k)._value()).startswith(REQUIRED)]
    missing = sorted(unset + sorted(_missing_keys(cfg)))
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (set it on the command line, e.g. {missing[0]}=...)")


def _missing_keys(node, prefix: str = ""):
    """The `???` values below `node`, without resolving interpolations (OmegaConf.missing_keys resolves them, and
    `${hydra:...}` cannot resolve outside Hydra's app)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child, full = node._get_node(key), f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix}[{key}]"
        if child._is_missing():
            yield full
        elif not child._is_interpolation() and isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            yield from _missing_keys(child, f"{full}.")


CHECKED_GROUPS = ("model", "data", "task", "optimizer", "scheduler", "trainer")


def check_config(cfg: DictConfig) -> None:
    """check_values, then every group with a `_target_` against its target's signature (which imports it)."""
    check_values(cfg)
    for path in CHECKED_GROUPS:
        node = cfg.get(path)
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                check_node(node, path)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{path}._target_: cannot import {node._target_!r} ({e})") from None


def check_config_from_source(cfg: DictConfig) -> None:
    """check_config without importing the targets (source_signature): what it cannot read, it leaves to
    check_config after the imports."""
    check_values(cfg)
    for path in CHECKED_GROUPS:
        node = cfg.get(path)
        if isinstance(node, DictConfig) and "_target_" in node:
            signature = source_signature(str(node._target_))
            if signature is not None:
                check_node(node, path, signature)


# -- before Hydra's app ------------------------------------------------------------------------------------------
# Hydra reports a bad override in its own words, several lines, and a missing value surfaces only once the run is
# built, after torch, Lightning and W&B are imported (10-20 s). preflight() gives those errors as the project's one
# line, before any of that is imported.

HYDRA_FLAGS = ("-m", "--multirun")  # any other flag (--help, --cfg, --config-name, -sc ...) is left to Hydra


def preflight(config_dir, config_name: str, argv: list[str] | None = None) -> None:
    """train.py / evaluate.py, before their Hydra app: an override Hydra cannot parse (with the quoting that
    works), a key the config lacks (with the project's did-you-mean) and a missing value each print one
    `Error in config: ...` line and exit 2, in about a second. Anything else is left to Hydra and the run."""
    try:
        _preflight(Path(config_dir), config_name, sys.argv[1:] if argv is None else list(argv))
    except ConfigError as e:
        print(f"Error in config: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _preflight(config_dir: Path, config_name: str, args: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, OverrideParseException

    if any(a.startswith("-") and a not in HYDRA_FLAGS for a in args):
        return
    parser, parsed = OverridesParser.create(), []
    for text in (a for a in args if a not in HYDRA_FLAGS):
        try:
            parsed += parser.parse_overrides([text])
        except OverrideParseException as e:
            raise ConfigError(_unparsable(parser, text, e)) from None
    job = []  # a sweep is checked with its first value
    for o in parsed:
        if o.is_sweep_override():
            try:
                job.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
            except Exception:  # interval(...) and other sweeper-only syntax
                return
        else:
            job.append(o.input_line)
    try:
        cfg = _compose(config_dir, config_name, job)
    except ConfigCompositionException as e:
        message = _unknown_key(config_dir, config_name, job, str(e))
        if message:
            raise ConfigError(message) from None
        return  # Hydra says it again, in its words (e.g. "Could not find 'masking/vanilla'" and the options)
    except Exception:
        return
    check_config_from_source(cfg)


def _compose(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _unparsable(parser, text: str, error: Exception) -> str:
    """An override Hydra's grammar refuses, e.g. a path with `=` (Lightning's `epoch=0-step=4.ckpt`): the quoting
    that makes it one string value, as typed in a shell."""
    reason = str(error).splitlines()[0]
    key, sep, value = text.partition("=")
    if sep:
        for quoted in (f'{key}="{value}"', f"{key}='{value}'"):
            try:
                parser.parse_overrides([quoted])
            except Exception:
                continue
            shell = f"'{quoted}'" if "'" not in quoted else '"' + quoted.replace('"', '\\"') + '"'
            return f"{text}: Hydra cannot read this value ({reason}); quote it: {shell}"
    return f"{text}: Hydra cannot read this override ({reason})"


def _unknown_key(config_dir: Path, config_name: str, overrides: list[str], message: str) -> str | None:
    """Hydra's "Could not override 'k'" (a key the config lacks) as one line with the closest existing key, and
    its "Could not append ... already at 'k'" (a `+` on a key the config has) with the override that works."""
    found = re.search(r"Could not override '([^']+)'", message)
    if found is None:
        found = re.search(r"Could not append to config\. An item is already at '([^']+)'", message)
        if found is None:
            return None
        key = found.group(1)
        given = next((o for o in overrides if o.lstrip("+").split("=", 1)[0] == key), f"+{key}=...")
        return f"{given}: {key} is already in the config; set it without the +: {given.lstrip('+')}"
    key = found.group(1)
    given = next((o for o in overrides if o.split("=", 1)[0] == key), f"{key}=...")
    rest = [o for o in overrides if o != given]
    try:
        cfg = _compose(config_dir, config_name, rest)
    except Exception:
        return None
    node, path, hint = cfg, [], ""
    for part in key.split("."):  # down to the first part the config lacks
        if isinstance(node, DictConfig) and part in node:
            node, path = node[part], [*path, part]
            continue
        names = [str(k) for k in node] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(part, names, n=1)
        if close:
            value = given.split("=", 1)[1] if "=" in given else "..."
            hint = f" (did you mean {'.'.join([*path, close[0], *key.split('.')[len(path) + 1:]])}={value}?)"
        break
    where = ".".join(path) or "the config"
    return (f"{given}: {where} has no key {key.split('.')[len(path)]!r}{hint}; a key it lacks is added with "
            f"+{given}")
