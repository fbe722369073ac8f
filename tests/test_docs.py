"""The README and docs stay true to the tree: every config choice is listed, every module a command names exists."""

import importlib.util
import re

import pytest

from .conftest import CONF, ROOT

DOCS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "paths"))


def readme_group_table() -> dict[str, str]:
    """{group: its choices cell} from the README's config-group table."""
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"^\| `([\w/]+)` \| ([^|]*) \|", text, flags=re.M))


@pytest.mark.parametrize("group", GROUPS)
def test_readme_lists_every_choice_of_every_config_group(group):
    table = readme_group_table()
    assert group in table, f"README's config-group table has no row for `{group}`"
    if group == "experiment":  # too many to list: the recipes doc names each one
        listed = set(re.findall(r"experiment=(\w+)", (ROOT / "docs" / "recipes.md").read_text() +
                                (ROOT / "README.md").read_text() + (ROOT / "Makefile").read_text()))
    else:
        listed = set(re.findall(r"[a-z0-9_]+", table[group]))
    missing = {p.stem for p in (CONF / group).glob("*.yaml")} - listed
    assert not missing, f"README does not name {sorted(missing)} of `{group}` (conf/{group}/ has them)"


def test_every_module_a_command_names_exists():
    modules = set()
    for path in DOCS:
        modules |= {(path.name, m) for m in re.findall(r"python3? -m ([A-Za-z_][\w.]*)", path.read_text())}
    assert ("README.md", "data_prep") in modules  # the pattern reads the docs at all
    missing = [(f, m) for f, m in sorted(modules) if m not in ("pytest", "http.server", "venv")
               and importlib.util.find_spec(m) is None]
    assert not missing, f"commands name modules that do not exist: {missing}"


def test_every_src_path_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"`((?:src|conf|docs|tests|benchmarks|data_prep)/[\w./-]+\.(?:py|yaml|md|sh))`", text))
    assert paths, "the README names no files (the pattern is wrong)"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
