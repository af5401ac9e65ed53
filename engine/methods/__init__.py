"""The method registry. Every module in this package that calls `register` adds methods;
modules are discovered automatically, so a new method is one new file here."""
from __future__ import annotations

import importlib
import pkgutil

from engine.errors import UnlearnError
from engine.methods.base import Method, parse_variant

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.id in _REGISTRY:
        raise ValueError(f"method {method.id!r} registered twice")
    _REGISTRY[method.id] = method
    return method


def _discover() -> None:
    # The paper's seven first (the order `unlearn methods` lists them in), then the rest by file name.
    names = sorted((info.name for info in pkgutil.iter_modules(__path__)
                    if info.name not in {"base", "forget_terms", "retain_terms", "not_here"}),
                   key=lambda n: (n != "paper_presets", n))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")


def get_method(method_id: str) -> Method:
    from engine.methods.not_here import NOT_RUNNABLE

    for absent, name, why in NOT_RUNNABLE:
        if method_id == absent:
            raise UnlearnError(f"method {method_id!r} ({name}) is not runnable here: {why}")
    base, knobs = parse_variant(method_id)
    if base not in _REGISTRY:
        raise UnlearnError(f"unknown method {base!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[base].with_knobs(knobs)


def list_methods() -> list[Method]:
    return list(_REGISTRY.values())


_discover()
