"""The one way the lab checks a setting: `Node` dataclasses whose fields carry a check, and the checks themselves.

Defaults live in the YAML only (conf/): a field has a type and a range, never a default, so a key the YAML lost is
an error, not a silent fallback. Every check raises one LabError line naming the dotted key, the value and what
is allowed. Cross-field rules run once after parsing (a class's `from_config`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab import LabError

Check = Callable[[Any, str], Any]


def not_allowed(key: str, value: Any, allowed: str) -> LabError:
    return LabError(f"{key}={value!r} is not allowed: expected {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int | None = None, *, allow: tuple[Any, ...] = ()) -> Check:
    def check(value: Any, key: str) -> Any:
        if value in allow and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            extra = f" or {' / '.join(map(str, allow))}" if allow else ""
            raise not_allowed(key, value, f"an integer{f' >= {minimum}' if minimum is not None else ''}{extra}")
        return value
    return check


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low == 0 and low_open and high is None:
        return "a positive number"
    if high is None:
        return f"a number {'>' if low_open else '>='} {low}" if low is not None else "a finite number"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Check:
    def check(value: Any, key: str) -> Any:
        if value is None and optional:
            return None
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise not_allowed(key, value, _range_text(low, high, low_open, high_open) + (" or null" if optional else ""))
        return float(value)
    return check


def choice(*options: Any) -> Check:
    def check(value: Any, key: str) -> Any:
        if isinstance(value, bool) and not any(isinstance(o, bool) for o in options):
            raise not_allowed(key, value, f"one of {', '.join(map(str, options))}")
        if value not in options:
            raise not_allowed(key, value, f"one of {', '.join(map(str, options))}")
        return value
    return check


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise not_allowed(key, value, "true or false")
    return value


def text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise not_allowed(key, value, "a non-empty string")
    return value


def list_of(check: Check, *, allow_empty: bool = True) -> Check:
    """A list whose every item passes `check` (items named key[i] in messages); returned as a tuple."""
    def check_list(value: Any, key: str) -> tuple[Any, ...]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise not_allowed(key, value, "a list, e.g. [a, b]")
        if not value and not allow_empty:
            raise not_allowed(key, value, "a non-empty list")
        return tuple(check(item, f"{key}[{i}]") for i, item in enumerate(value))
    return check_list


def text_map(value: Any, key: str) -> dict[str, str]:
    """A mapping of names to scalar values, as strings (MLflow tags)."""
    if not isinstance(value, Mapping):
        raise not_allowed(key, value, "a mapping {name: value}")
    for name, item in value.items():
        if isinstance(item, (Mapping, list, tuple)) or item is None:
            raise not_allowed(f"{key}.{name}", item, "a plain value (text or number)")
    return {str(name): str(item) for name, item in value.items()}


def optional(check: Check) -> Check:
    return lambda value, key: None if value is None else check(value, key)


_ABSENT = object()


def required(cfg: DictConfig, key: str) -> Any:
    """cfg's value at the dotted `key`; a key the YAML lost is one LabError line, never a default from code."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT:
        raise LabError(f"{key} is missing from the config (it has no default in code; restore it in conf/)")
    return value


def field(check: Check) -> Any:
    return dataclasses.field(metadata={"check": check})


class Node:
    """A frozen dataclass parsed from one config node: every field present and checked."""

    # closed: a key that is no field is refused (a `+node.typo=...` override); open nodes (the trainer's, the
    # optimizer's) also hold keys other code reads
    closed: ClassVar[bool] = False

    @classmethod
    def parse(cls, node: Any, prefix: str) -> Any:
        if isinstance(node, (DictConfig, ListConfig)):
            try:
                node = OmegaConf.to_container(node, resolve=True)
            except OmegaConfBaseException as err:  # an interpolation to a key that is not there
                where = getattr(err, "full_key", None) or prefix or "the config"
                raise LabError(f"{where} does not resolve: {str(err).strip().splitlines()[0]}") from None
        if not isinstance(node, Mapping):
            raise LabError(f"{prefix or 'the config'} must be a mapping of settings, not {node!r}")
        names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
        unknown = sorted(set(map(str, node)) - set(names)) if cls.closed else []
        if unknown:
            raise LabError(f"{prefix}.{unknown[0]} is not a setting here (the settings are {', '.join(names)})")
        values = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("derived"):  # built from other keys by the class's from_config
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name  # prefix "": the command's root node
            if f.name not in node:
                raise LabError(f"{key} is missing from the config (it has no default in code; restore it in conf/)")
            check = f.metadata.get("check")
            values[f.name] = check(node[f.name], key) if check else node[f.name]
        return cls(**values)

    def record(self) -> dict[str, Any]:
        """The node as plain containers (lists, not tuples), as the config held it: what a checkpoint saves, so
        it loads with weights_only=True."""
        return _plain(dataclasses.asdict(self))


def resolved(node: Any) -> Any:
    """A config node as plain, resolved containers (anything else as it is): what every check reads."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
