"""Evaluate a checkpoint on the test split for A, V and A+V inputs: python evaluate.py ckpt_path=PATH."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zorro.config import preflight
from zorro.errors import ConfigError, DataError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from zorro.run import evaluate

    try:
        evaluate(cfg, HydraConfig.get().overrides.task)  # the run's values given on the command line
    except ConfigError as e:
        print(f"Error in config: {e}", file=sys.stderr)
        raise SystemExit(2)
    except DataError as e:  # e.g. fewer clips scored than the split holds
        print(f"Error in data: {e}", file=sys.stderr)
        raise SystemExit(3)


if __name__ == "__main__":
    preflight(Path(__file__).parent / "conf", "evaluate")  # config errors in a second, before torch is imported
    main()
