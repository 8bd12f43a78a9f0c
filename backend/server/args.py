"""Typed access to a request's JSON arguments and buffers (pure Python + numpy).

Arguments are read by their specs (``backend.wire.operations``: name, default, range), the
same ones the add-on builds its requests with. Every failure is a WireError
``invalid_argument`` whose message names the operation and the field; ``done()`` rejects
arguments and buffers the operation does not know, so a typo (or a file path a client hopes
the service will read) never passes silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backend.wire.operations import MAX_INT, REQUIRED, Flag, Float, Floats, Int, Operation, Spec, Text
from backend.wire.protocol import ErrorCode, Request, WireError

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

    def _get(self, spec: Spec) -> tuple[bool, Any]:
        self._seen_args.add(spec.name)
        if spec.name in self._args and self._args[spec.name] is not None:
            return True, self._args[spec.name]
        if spec.default is REQUIRED:
            raise self.error(f"argument '{spec.name}' is required")
        return False, spec.default

    def int(self, spec: Int, hi: int | None = None) -> Any:
        """The integer (or the spec's default); ``hi`` narrows the spec's range to a limit of
        this service or of the thing the request is about."""
        given, v = self._get(spec)
        if not given:
            return v
        top = spec.hi if hi is None else min(spec.hi, hi)
        if not isinstance(v, int) or isinstance(v, bool) or not spec.lo <= v <= top:
            raise self.error(f"argument '{spec.name}' must be an integer {_range(spec.lo, top)}, got {_show(v)}")
        return v

    def float(self, spec: Float) -> Any:
        given, v = self._get(spec)
        if not given:
            return v
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not spec.lo <= float(v) <= spec.hi:
            raise self.error(f"argument '{spec.name}' must be a number in [{spec.lo}, {spec.hi}], got {_show(v)}")
        return float(v)

    def bool(self, spec: Flag) -> Any:
        given, v = self._get(spec)
        if given and not isinstance(v, bool):
            raise self.error(f"argument '{spec.name}' must be true or false, got {_show(v)}")
        return v

    def str(self, spec: Text) -> Any:
        given, v = self._get(spec)
        if not given:
            return v
        if not isinstance(v, str) or not 0 < len(v) <= spec.max_len or not v.isprintable():
            raise self.error(f"argument '{spec.name}' must be printable text of 1-{spec.max_len} characters")
        if spec.choices is not None and v not in spec.choices:
            raise self.error(f"argument '{spec.name}' must be one of {', '.join(spec.choices)}, got {_show(v)}")
        return v

    def floats(self, spec: Floats) -> Any:
        given, v = self._get(spec)
        if not given:
            return v
        ok = isinstance(v, list) and len(v) == spec.length
        ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and spec.lo <= x <= spec.hi for x in v)
        if not ok:
            raise self.error(f"argument '{spec.name}' must be a list of {spec.length} numbers in [{spec.lo}, {spec.hi}]")
        return tuple(float(x) for x in v)

    def values(self, operation: type[Operation], hi: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Every JSON argument of ``operation`` by name, each read by its spec; ``hi`` narrows
        the top of integers by name (see ``int``)."""
        read = {Float: self.float, Flag: self.bool, Text: self.str, Floats: self.floats}
        out = {}
        for name, spec in operation.specs().items():
            if isinstance(spec, Int):
                out[name] = self.int(spec, (hi or {}).get(name))
            else:
                out[name] = read[type(spec)](spec)
        return out

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


def _range(lo: int, hi: int) -> str:
    return f"in [{lo}, {hi}]" if hi < MAX_INT else f">= {lo}"


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
