# Copyright © 2026 mstream-mlx contributors.
"""The model families and their registry.

One flat file per family, named after its HF ``model_type`` (as in mlx-lm); each
declares a ``FAMILY`` (:class:`~mstream_mlx.models.base.Family`) next to its
``Model`` and ``ModelArgs``.  The registry finds every such file in this package, so
load, convert and export ask it instead of matching names (``docs/adding-a-model.md``).
"""

import importlib
import pkgutil
from functools import lru_cache
from typing import Dict, List, Optional, Tuple, Type

from .base import Family


@lru_cache(maxsize=None)
def families() -> Tuple[Family, ...]:
    """Every family file's ``FAMILY``, sorted by name."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if family is not None:
            assert family.name == info.name, f"{info.name}.py declares {family.name}"
            found.append(family)
    return tuple(found)


def model_types() -> List[str]:
    """Every ``model_type`` some family reads, in registry order."""
    return [t for f in families() for t in f.model_types]


def find_family(model_type: Optional[str]) -> Optional[Family]:
    """The family that reads ``model_type``, or None."""
    for f in families():
        if model_type in f.model_types:
            return f
    return None


def family_for(config: dict) -> Family:
    """The family of a config's ``model_type``; one clear error if none reads it."""
    family = find_family(config.get("model_type"))
    if family is None:
        raise ValueError(
            f"Model type {config.get('model_type')!r} is not supported by mstream-mlx "
            f"(supported: {', '.join(model_types())})."
        )
    return family


def architectures() -> Dict[str, Tuple[Family, Optional[str]]]:
    """Every known ``architectures`` class name -> (its family, the layout it
    implies or None)."""
    return {a: (f, layout) for f in families() for a, layout in f.architectures.items()}


def get_model_classes(config: dict) -> Tuple[Type, Type]:
    """``(Model, ModelArgs)`` for a config's ``model_type`` (mlx-lm's hook)."""
    module = importlib.import_module(f"{__name__}.{family_for(config).name}")
    return module.Model, module.ModelArgs
