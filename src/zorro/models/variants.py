"""Named variants, as timm's registered factories: a variant is a backbone class and the keyword defaults its factory
passes, kept as data (`factory.model_class`, `factory.defaults`) so that they can be read without building a model.
tests/models/test_model_configs.py holds every variant equal to its conf/model/*.yaml."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MappingProxyType
from typing import Any


def variant(base: type | Callable, /, **defaults: Any) -> Callable[[Callable], Callable]:
    """Make the decorated function a named factory: `name(**kwargs)` builds `base` with `defaults`, which the call's
    keywords override. `base` is a backbone class, or another variant whose defaults these extend (as a tiny YAML
    extends its base YAML and lists what differs). The decorated function only names and documents the variant."""
    cls, inherited = (base, {}) if isinstance(base, type) else (base.model_class, base.defaults)
    merged = MappingProxyType({**inherited, **defaults})

    def register(named: Callable) -> Callable:
        @functools.wraps(named)
        def create(**kwargs):
            return cls(**{**merged, **kwargs})

        create.model_class, create.defaults = cls, merged
        return create

    return register

