"""The baselines against their official code, on the same seeded weights (every LayerNorm and bias perturbed) and
inputs, loaded through the path a user takes (`pretrained=` / `init_from=`): one table of max |ours - official|
per model and stage, the training loss of each recipe against the official loss on the same batch included.

    python benchmarks/official_equivalence.py --cav-mae /tmp/cav-mae --scenic /tmp/scenic [--scenic-python ...]

  --cav-mae: a checkout of github.com/YuanGongND/cav-mae (benchmarks/equivalence/cav_mae.py; its code runs with
             timm 0.4.5, installed under /tmp on first use unless --cav-mae-python names an interpreter with it);
  --scenic:  a checkout of github.com/google-research/scenic (benchmarks/equivalence/mbt.py; JAX in its own venv,
             --scenic-python).
A model whose checkout is not given, or whose module is not in this tree, is printed as "skipped: ...".
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = (("CAV-MAE", "cav_mae", "cav_mae"), ("MBT", "mbt", "scenic"))  # (name, module, option)


def run(model: str, module: str, checkout: str | None, python: str | None) -> list[tuple[str, str, str]]:
    if not checkout:
        return [(model, f"skipped: no --{'cav-mae' if module == 'cav_mae' else 'scenic'} checkout given", "")]
    try:
        compare = importlib.import_module(f"equivalence.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"equivalence.{module}":
            raise
        return [(model, f"skipped: benchmarks/equivalence/{module}.py is not in this tree", "")]
    return [(name, stage, f"{diff:.3g}") for name, stage, diff in compare.main(checkout, python)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cav-mae", help="a checkout of YuanGongND/cav-mae")
    parser.add_argument("--cav-mae-python", help="an interpreter with the official code's timm 0.4.5")
    parser.add_argument("--scenic", help="a checkout of google-research/scenic")
    parser.add_argument("--scenic-python", help="the interpreter of a venv with JAX and scenic's requirements")
    args = parser.parse_args(argv)
    rows = []
    for name, module, option in MODELS:
        rows += run(name, module, getattr(args, option), getattr(args, f"{option}_python"))
    width = max(len(stage) for _, stage, _ in rows)
    print(f"{'model':8s} {'stage':{width}s} max |ours - official|")
    for name, stage, diff in rows:
        print(f"{name:8s} {stage:{width}s} {diff}")


if __name__ == "__main__":
    main()
