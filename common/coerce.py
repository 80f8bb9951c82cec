"""The config engine: YAML values and command-line strings to typed, validated dataclass fields.

Generic over frozen dataclasses whose fields are declared with :func:`opt` (a docstring plus
the constraints ``choices``, ``min`` and ``max`` in the field's metadata); common/config.py
declares convoy's sections with it. A value is checked against its field's annotation (bool,
int, float, str, ``X | None``, unions, ``tuple[X, ...]`` from a list or ``"a,b"``,
``dict[str, X]`` from a mapping or ``"name:amount,name:amount"``), converted to its
canonical type, then against its constraints. Every error is a :class:`ConfigError` whose
message names the dotted key, the value and what is allowed.

Why not a library: pydantic, cattrs and dacite were the candidates. Each words its errors
its own way (pydantic's "Input should be a valid integer", cattrs' exception groups, dacite's
WrongTypeError), none of them reads the command-line forms above for tuples and resource
maps, and keeping convoy's messages would mean catching and rewriting every error they
raise. pydantic would also turn the plain frozen dataclasses into its own model types. The
engine is about 150 lines of plain typing introspection, so it stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key, the value and what is allowed."""


def opt(default: Any, doc: str, **constraints: Any) -> Any:
    """A dataclass field with a docstring and validation constraints in its metadata."""
    if isinstance(default, dict):  # mutable defaults need a factory
        return field(default_factory=lambda: dict(default), metadata={"doc": doc, **constraints})
    return field(default=default, metadata={"doc": doc, **constraints})


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of str to {type_name(typing.get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the value in its canonical type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # an optional field left unset (e.g. a backend default), not an empty value
        concrete = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(concrete) == 1:  # X | None: X's own error says what is wrong
            return coerce(key, value, concrete[0])
        for arg in typing.get_args(tp):
            try:
                return coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads ``1e-3`` (no dot) as a string; users write learning rates that way.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            # NaN compares false with every bound, so ``min``/``max`` alone would let it through.
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r}: must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif origin is dict:
        # Ray resource maps: YAML mappings, or "name:amount,name:amount" on the command line.
        if value is None:
            return {}
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            try:
                value = {k.strip(): yaml.safe_load(v) for k, v in (p.split(":", 1) for p in pairs)}
            except ValueError:
                raise ConfigError(
                    f"{key}={value!r}: expected a mapping like {{collector: 1}} or 'collector:1'"
                ) from None
        if isinstance(value, dict):
            _, val_tp = typing.get_args(tp)
            out = {}
            for k, v in value.items():
                if not isinstance(k, str) or not k:
                    raise ConfigError(f"{key}: resource names must be non-empty strings, got {k!r}")
                amount = coerce(f"{key}.{k}", v, val_tp)
                if amount < 0:
                    raise ConfigError(f"{key}.{k}={v!r}: must be >= 0")
                out[k] = amount
            return out
    elif origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list | tuple):
            return tuple(coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    raise ConfigError(f"{key}={value!r}: expected {type_name(tp)}")


def check_constraints(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}={value!r}: not an allowed value; allowed: {allowed}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}={value!r}: must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}={value!r}: must be <= {meta['max']}")


def build_dataclass(section: str, cls: type, values: typing.Mapping[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from raw ``values``, each coerced and checked;
    ``section`` prefixes the keys in error messages (``learner.batch_size``)."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {section}.{key}{hint}; keys of {section}: {', '.join(sorted(known))}")
        value = coerce(f"{section}.{key}", raw, hints[key])
        check_constraints(f"{section}.{key}", value, known[key].metadata)
        kwargs[key] = value
    return cls(**kwargs)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only ``true`` and ``false``. YAML 1.1 also
    reads ``on``, ``off``, ``yes`` and ``no`` as booleans, so ``replay.mirror=off`` would
    arrive as False; a bool field still takes those words (:func:`coerce`)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_BOOL_WORDS = {"on": True, "yes": True, "off": False, "no": False}


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def parse_override(text: str, sections: typing.Collection[str]) -> tuple[str, str, Any]:
    """``'learner.batch_size=128'`` -> ``('learner', 'batch_size', 128)`` (value parsed as YAML);
    ``sections`` are the section names allowed before the dot."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. learner.batch_size=128")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. learner.batch_size=128")
    section, key = parts
    if section not in sections:
        raise ConfigError(f"unknown section {section!r} in {text!r}; sections: {', '.join(sections)}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    # A path like 'runs/x' or a URL stays a string; only scalars YAML understands get typed.
    return section, key, value


def describe_fields(sections: typing.Mapping[str, type]) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every field of every section's dataclass."""
    rows = []
    for name, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            if "choices" in f.metadata:
                doc += f" One of: {', '.join(map(str, f.metadata['choices']))}."
            # A mutable default (a dict) is built by default_factory; show its value, not MISSING.
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{name}.{f.name}", type_name(hints[f.name]), default, doc))
    return rows
