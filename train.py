"""Train a model: python train.py [model=...] [masking=...] [task=...] [data=...] [trainer=...] (see conf/train.yaml)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zorro.config import preflight
from zorro.errors import ConfigError, DataError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from zorro.run import train  # imported here so --help and config errors stay fast

    try:
        metrics = train(cfg, HydraConfig.get().overrides.task)  # the run's values given on the command line
    except ConfigError as e:
        print(f"Error in config: {e}", file=sys.stderr)
        raise SystemExit(2)
    except DataError as e:
        print(f"Error in data: {e}", file=sys.stderr)
        raise SystemExit(3)
    return metrics.get("val/score")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    preflight(Path(__file__).parent / "conf", "train")  # config errors in a second, before torch is imported
    main()
