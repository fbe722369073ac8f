"""Each model YAML builds the model its named factory builds: conf/model/<X>.yaml, composed as train.yaml composes it
(`model=<X>` with train.yaml's defaults, interpolations resolved), gives the same constructor keywords as MODELS["<X>_base"]
(the class signature's defaults overlaid with the factory's), and <X>_tiny.yaml as MODELS["<X>_tiny"]. Read from the
configs and the factories' defaults, no model is built: the file takes about a second."""

import inspect

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from zorro.models import MODELS

from ..conftest import CONF, compose_cfg

YAMLS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def factory_name(yaml: str) -> str:
    return yaml if yaml.endswith("_tiny") else f"{yaml}_base"


def class_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def plain(value):
    """Tuples (the factories' sequences) as lists (YAML's)."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_every_model_yaml_has_a_factory_and_every_factory_a_yaml():
    assert sorted(MODELS) == sorted(factory_name(y) for y in YAMLS)


@pytest.mark.parametrize("yaml", YAMLS)
def test_model_yaml_equals_its_factory(yaml, tmp_path):
    factory = MODELS[factory_name(yaml)]
    node = compose_cfg(overrides=[f"model={yaml}"], output_dir=tmp_path).model
    assert get_class(node._target_) is factory.model_class
    defaults = class_defaults(factory.model_class)
    yaml_values = OmegaConf.to_container(node, resolve=True)
    yaml_values.pop("_target_")
    configured = {**defaults, **yaml_values}  # what Hydra's instantiate builds
    built = {**defaults, **factory.defaults}  # what the factory builds
    differ = {k: (plain(configured.get(k, "<unset>")), plain(built.get(k, "<unset>")))
              for k in sorted(configured.keys() | built.keys()) if plain(configured.get(k)) != plain(built.get(k))}
    assert not differ, f"conf/model/{yaml}.yaml vs {factory.__name__} (YAML, factory): {differ}"

