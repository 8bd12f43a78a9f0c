"""Typed access to a request's JSON arguments and buffers (pure Python + numpy).

Every failure is a WireError ``invalid_argument`` whose message names the operation and the
field; ``done()`` rejects arguments and buffers the operation does not know, so a typo (or a
file path a client hopes the service will read) never passes silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from backend.wire.protocol import ErrorCode, Request, WireError

_REQUIRED: Any = object()
Shape = tuple[int | None, ...]  # None: any length


class Args:
    def __init__(self, request: Request) -> None:
        self.op = request.op
        self._args = request.args
        self._arrays = request.arrays
        self._seen_args: set[str] = set()
        self._seen_arrays: set[str] = set()

    def error(self, message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> WireError:
        return WireError(code, f"{self.op}: {message}")

    def _get(self, name: str, default: Any) -> tuple[bool, Any]:
        self._seen_args.add(name)
        if name in self._args and self._args[name] is not None:
            return True, self._args[name]
        if default is _REQUIRED:
            raise self.error(f"argument '{name}' is required")
        return False, default

    def int(self, name: str, default: Any = _REQUIRED, lo: int | None = None, hi: int | None = None) -> int:
        given, v = self._get(name, default)
        if not given:
            return v
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.error(f"argument '{name}' must be an integer in [{lo}, {hi}], got {_show(v)}")
        return v

    def float(self, name: str, default: Any = _REQUIRED, lo: float = -math.inf, hi: float = math.inf) -> float:
        given, v = self._get(name, default)
        if not given:
            return v
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= float(v) <= hi:
            raise self.error(f"argument '{name}' must be a number in [{lo}, {hi}], got {_show(v)}")
        return float(v)

    def bool(self, name: str, default: Any = _REQUIRED) -> bool:
        given, v = self._get(name, default)
        if given and not isinstance(v, bool):
            raise self.error(f"argument '{name}' must be true or false, got {_show(v)}")
        return v

    def str(self, name: str, default: Any = _REQUIRED, choices: Sequence[str] | None = None, max_len: int = 128) -> str:
        given, v = self._get(name, default)
        if not given:
            return v
        if not isinstance(v, str) or not 0 < len(v) <= max_len or not v.isprintable():
            raise self.error(f"argument '{name}' must be printable text of 1-{max_len} characters")
        if choices is not None and v not in choices:
            raise self.error(f"argument '{name}' must be one of {', '.join(choices)}, got {_show(v)}")
        return v

    def floats(self, name: str, length: int, default: Any = _REQUIRED, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, ...]:
        given, v = self._get(name, default)
        if not given:
            return v
        ok = isinstance(v, list) and len(v) == length
        ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi for x in v)
        if not ok:
            raise self.error(f"argument '{name}' must be a list of {length} numbers in [{lo}, {hi}]")
        return tuple(float(x) for x in v)

    def array(self, name: str, dtypes: Sequence[str], shapes: Sequence[Shape], required: bool = True) -> np.ndarray | None:
        """The buffer ``name``, checked against the allowed dtypes and shapes."""
        self._seen_arrays.add(name)
        a = self._arrays.get(name)
        if a is None:
            if required:
                raise self.error(f"buffer '{name}' is required")
            return None
        if a.dtype.str.replace("|", "<") not in dtypes:
            raise self.error(f"buffer '{name}' must have dtype {' or '.join(dtypes)}, got {a.dtype.str}")
        if not any(_fits(a.shape, s) for s in shapes):
            want = " or ".join("[" + ", ".join("*" if d is None else str(d) for d in s) + "]" for s in shapes)
            raise self.error(f"buffer '{name}' must have shape {want}, got {list(a.shape)}")
        return a

    def names(self, prefix: str) -> list[str]:
        """Buffer names starting with ``prefix``, sorted (e.g. portrait0, portrait1)."""
        return sorted(n for n in self._arrays if n.startswith(prefix))

    def done(self) -> None:
        """Raise if the request carries an argument or buffer that was never asked for."""
        for extra in sorted(set(self._args) - self._seen_args):
            raise self.error(f"unknown argument '{extra[:40]}'")
        for extra in sorted(set(self._arrays) - self._seen_arrays):
            raise self.error(f"unknown buffer '{extra}'")


def _fits(shape: tuple[int, ...], spec: Shape) -> bool:
    return len(shape) == len(spec) and all(s is None or s == d for d, s in zip(shape, spec))


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
