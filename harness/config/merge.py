"""Folding settings written for another tool (a DeepSpeed JSON, an accelerate config) into the
harness config. A value is adopted unless the harness config set that key itself (file or CLI)
to something else, which is an error naming both values. Pure Python: harness.config imports no torch."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from harness.errors import ConfigError

AUTO = "auto"


def get_dotted(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


class Merger:
    def __init__(self, cfg, explicit: set[str], source: str, fix: str) -> None:
        self.cfg = cfg
        self.explicit = explicit
        self.source = source
        self.fix = fix
        """How to resolve a contradiction, ending the error message."""

    def harness_value(self, key: str) -> Any:
        section, _, name = key.rpartition(".")
        node = getattr(self.cfg, section) if section else self.cfg
        return getattr(node, name)

    def _set(self, key: str, value: Any) -> None:
        section, _, name = key.rpartition(".")
        node = getattr(self.cfg, section) if section else self.cfg
        setattr(node, name, value)

    def adopt(self, their_key: str, their_value: Any, key: str, value: Any) -> None:
        """Make harness `key` equal `value` (derived from the other tool's `their_key`), or fail if
        the harness config set it to something else."""
        current = self.harness_value(key)
        if key in self.explicit and not _same(current, value):
            raise ConfigError(
                f"{self.source} {their_key}={json.dumps(their_value)} contradicts {key}={current} from the harness "
                f"config; {self.fix}"
            )
        self._set(key, value)

    def number(self, data: dict[str, Any], their_key: str, key: str, convert: Callable[[Any], Any] = float) -> None:
        their_value = get_dotted(data, their_key)
        if their_value is None or their_value == AUTO:
            return
        try:
            value = convert(their_value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.source} {their_key}={json.dumps(their_value)} is not a number") from None
        self.adopt(their_key, their_value, key, value)


def integer(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(value)
    return int(float(value))
