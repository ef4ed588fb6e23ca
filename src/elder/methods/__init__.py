"""Editing methods behind one contract, found by name.

A method is a subpackage of `elder.methods` whose `__init__` exports `METHOD`, its EditingMethod subclass (as
`elder.methods.elder` does), or a class another package names under the entry-point group `elder.methods`.
Adding one never edits a list here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType

from elder.methods.base import (
    Answer,
    EditingMethod,
    EditResult,
    EditsInContext,
    Forgets,
    MethodError,
    TokenPrediction,
    TunesThreshold,
)

ENTRY_POINT_GROUP = "elder.methods"


def registered() -> Mapping[str, type[EditingMethod]]:
    """Every method, by name: this package's method folders, then installed plugins."""
    found: dict[str, type[EditingMethod]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.ispkg:
            _add(found, getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None), info.name)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _add(found, point.load(), f"entry point {point.name!r}")
    return MappingProxyType(found)


def _add(found: dict, cls, where: str) -> None:
    if cls is None:
        return
    if not (isinstance(cls, type) and issubclass(cls, EditingMethod)):
        raise TypeError(f"{where}: METHOD must be an EditingMethod subclass, got {cls!r}")
    if cls.name in found and found[cls.name] is not cls:
        raise TypeError(f"{where}: a method named {cls.name!r} is already registered")
    found[cls.name] = cls


def get_method(name: str) -> type[EditingMethod]:
    """The method registered under `name`."""
    methods = registered()
    if name not in methods:
        raise MethodError(f"unknown editing method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]


def method_of_folder(folder: str | os.PathLike) -> type[EditingMethod]:
    """The method whose saved state `folder` holds."""
    matches = [cls for cls in registered().values() if cls.recognises(folder)]
    if len(matches) != 1:
        what = "no editing method's" if not matches else f"several methods' ({', '.join(c.name for c in matches)})"
        raise MethodError(f"{folder} holds {what} saved state")
    return matches[0]


__all__ = ["Answer", "EditResult", "EditingMethod", "EditsInContext", "Forgets", "MethodError", "TokenPrediction",
           "TunesThreshold", "get_method", "method_of_folder", "registered"]
