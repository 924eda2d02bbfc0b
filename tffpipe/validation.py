"""Small named validators for configuration values (standard library only).

Each takes the value as a keyword argument, so the error names the parameter:
`validation.positive(clip=0.0)` raises `ConfigError('clip must be positive, got 0.0')`
with `error.field == 'clip'`. Every number must be finite first: `nan <= 0` is False,
so a plain comparison would let NaN through (a NaN clip once ran a whole "private" run).

`ConfigError.field` is the parameter's path inside the config (`dp.clip` once the
enclosing config has prefixed it), which is what lets the binaries name the flag that
set it without a hand-kept list.
"""

from __future__ import annotations

import math
import os
from typing import Any

from tffpipe import errors


class ConfigError(errors.InputError):
    """A configuration value that cannot be used; `field` is its path in the config."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def prefixed(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}{self.field}", str(self))


def _one(kwargs: dict[str, Any]) -> tuple[str, Any]:
    (item,) = kwargs.items()
    return item


def finite(**kwargs: float) -> float:
    name, value = _one(kwargs)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(name, f"{name} must be a finite number, got {value}")
    return value


def positive(**kwargs: float) -> float:
    name, value = _one(kwargs)
    if finite(**kwargs) <= 0:
        raise ConfigError(name, f"{name} must be positive, got {value}")
    return value


def non_negative(**kwargs: float) -> float:
    name, value = _one(kwargs)
    if finite(**kwargs) < 0:
        raise ConfigError(name, f"{name} must be >= 0, got {value}")
    return value


def in_range(low: float, high: float, *, closed: str = "[]", **kwargs: float) -> float:
    """`closed` says which ends are included: '[]', '[)', '(]' or '()'."""
    name, value = _one(kwargs)
    finite(**kwargs)
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise ConfigError(name, f"{name} must be in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value}")
    return value


def integer(minimum: int | None = None, **kwargs: int) -> int:
    name, value = _one(kwargs)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"{name} must be >= {minimum}, got {value}")
    return value


def plain_name(**kwargs: str) -> str:
    """A single visible directory name: printable, no separators, not starting with '.' ('.', '..', hidden)."""
    name, value = _one(kwargs)
    if not value or os.sep in value or "/" in value or value.startswith(".") or not value.isprintable():
        raise ConfigError(
            name,
            f"{name} must be a plain directory name (printable characters, no '/', not starting with '.'), "
            f"got {value!r}",
        )
    return value


def readable_file(**kwargs: str) -> str:
    name, value = _one(kwargs)
    if not os.path.isfile(value):
        raise ConfigError(name, f"{name}: no file at {value}")
    if not os.access(value, os.R_OK):
        raise ConfigError(name, f"{name}: {value} is not readable")
    return value
