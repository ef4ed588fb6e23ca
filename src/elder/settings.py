"""Typed method settings: a dataclass base that checks every field's type, presets, and --set text parsing."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from elder.errors import ElderError


class ConfigError(ElderError, ValueError):
    """A setting is unknown, of the wrong type, out of range or inconsistent with another."""


class MethodConfig:
    """Base of every method's settings dataclass: fields are typed (bool, int, float, str, tuple of strings, or
    None where the hint allows it) and checked on creation; `PRESETS` names bundles of overrides."""

    PRESETS: ClassVar[Mapping[str, Mapping]] = {}
    DEFAULT_PRESET: ClassVar[str | None] = None  # the preset `preset(None)` gives

    def __post_init__(self) -> None:
        for name, kinds in field_kinds(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, list) and tuple in kinds:
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not any(_is_kind(value, kind) for kind in kinds):
                raise ConfigError(f"{name} must be {_kind_words(kinds)}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks of the subclass; raise ConfigError naming the setting."""

    @classmethod
    def preset(cls, name: str | None = None, **overrides):
        """The named preset (default: DEFAULT_PRESET, or the dataclass defaults) with overrides applied."""
        name = cls.DEFAULT_PRESET if name is None else name
        if name is None:
            return cls.from_dict(overrides)
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    def replace(self, **changes):
        """A copy with the given fields changed, validated."""
        _check_known(type(self), changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready form (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping):
        """Inverse of to_dict; unknown keys are an error."""
        _check_known(cls, data)
        return cls(**data)

    @classmethod
    def parse(cls, name: str, text: str) -> Any:
        """Setting `name`'s value read from text (a --set value) against its type: booleans as true/false, yes/no,
        on/off or 1/0; lists as comma-separated values or a JSON list; none/null for an optional setting; strings
        as they are (or JSON-quoted). Raises ConfigError naming the setting and the value."""
        kinds = field_kinds(cls)
        if name not in kinds:
            raise ConfigError(f"unknown setting {name!r}; the settings are: {', '.join(sorted(kinds))}")
        return _parse(name, text, kinds[name])

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each setting's help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def field_kinds(cls: type) -> dict[str, tuple]:
    """Each field's accepted kinds: bool, int, float, str, tuple (of strings) or None."""
    kinds = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name, hint in typing.get_type_hints(cls).items():
        if name not in names:
            continue
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds[name] = tuple(None if o is type(None) else typing.get_origin(o) or o for o in options)
    return kinds


def _check_known(cls: type, data: Mapping) -> None:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")


def _is_kind(value: Any, kind: type | None) -> bool:
    if kind is None:
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def _kind_words(kinds: tuple) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             tuple: "a list of strings", None: "none"}
    return " or ".join(words[k] for k in kinds)


_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def _parse(name: str, text: str, kinds: tuple) -> Any:
    word = text.strip().lower()
    if None in kinds and word in _NONE:
        return None
    for kind in (k for k in kinds if k is not None):
        if kind is bool and word in _TRUE + _FALSE:
            return word in _TRUE
        if kind is int:
            try:
                return int(word)
            except ValueError:
                continue
        if kind is float:
            try:
                value = float(word)
            except ValueError:
                continue
            if value == value and abs(value) != float("inf"):  # not NaN or infinite
                return value
        if kind is str:
            quoted = len(text) >= 2 and text[0] == text[-1] == '"'
            return json.loads(text) if quoted and _json_string(text) else text
        if kind is tuple:
            if text.strip().startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError:
                    items = None
                if isinstance(items, list) and all(isinstance(i, str) for i in items):
                    return tuple(items)
                continue
            items = tuple(part.strip() for part in text.split(","))
            if all(items):
                return items
    raise ConfigError(f"{name}={text!r}: {name} takes {_kind_words(kinds)}")


def _json_string(text: str) -> bool:
    try:
        return isinstance(json.loads(text), str)
    except json.JSONDecodeError:
        return False
