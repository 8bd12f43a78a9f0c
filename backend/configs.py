"""The one way settings enter a configuration: ``Config.with_overrides``, then ``check``.

The frozen configuration dataclasses (``RefineConfig``, ``SynthConfig``, ``InitConfig``,
``DemoConfig``, ``CropConfig``, ``FrameRange``) take this mixin. The CLI, the service's job
handlers and the demo all build theirs as ``Default().with_overrides({...})``: one place
applies the values and one ``check`` per configuration says which field cannot work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from backend.wire.errors import InputError

C = TypeVar("C", bound="Config")


class SettingError(InputError):
    """A field whose value cannot work. ``field`` is its dotted name (``anti_spike.max_scale``)."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        super().__init__(f"setting '{field}' is {value!r}: {rule}")
        self.field, self.value, self.rule = field, value, rule

    def named(self, name: str) -> InputError:
        """The same error, the field called ``name`` (a flag, a wire argument) as its caller knows it."""
        return InputError(f"{name} {self.value}: {self.rule}")


def at_least(field: str, value: float, lo: float, rule: str = "") -> None:
    """Raise SettingError unless ``value`` >= ``lo``."""
    if not value >= lo:
        raise SettingError(field, value, rule or f"must be >= {lo}")


def above(field: str, value: float, lo: float, rule: str = "") -> None:
    """Raise SettingError unless ``value`` > ``lo``."""
    if not value > lo:
        raise SettingError(field, value, rule or f"must be > {lo}")


class Config:
    """Mixin of the configuration dataclasses: ``check`` and ``with_overrides``."""

    def check(self) -> None:
        """Raise SettingError naming the first field whose value cannot work; a configuration
        without rules of its own has nothing to check."""

    def with_overrides(self: C, overrides: Mapping[str, Any], names: Mapping[str, str] | None = None) -> C:
        """This configuration with ``overrides`` applied, then checked.

        Keys are field names, or dotted paths into nested configurations
        (``"anti_spike.max_scale"``); a None value leaves the field as it is, so optional
        flags and arguments pass straight through. ``names`` maps a field to what the caller
        calls it (``{"opacity_sparsity": "--opacity-sparsity"}``), so a failed check names it
        that way. Raises InputError for an unknown field and for a value ``check`` refuses.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        out = _replaced(self, given, type(self).__name__)
        try:
            out.check()
        except SettingError as exc:
            if names and exc.field in names:
                raise exc.named(names[exc.field]) from None
            raise
        return out


def _replaced(obj: Any, overrides: Mapping[str, Any], where: str) -> Any:
    """``obj`` (a dataclass) with dotted ``overrides`` applied; raises InputError for unknown names."""
    known = {f.name for f in dataclasses.fields(obj)}
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in known:
            raise InputError(f"{where} has no setting '{head}'")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, inner in nested.items():
        current = flat.get(head, getattr(obj, head))
        if not dataclasses.is_dataclass(current):
            raise InputError(f"{where}.{head} is {current!r}: give it whole, not '{head}.{next(iter(inner))}'")
        flat[head] = _replaced(current, inner, f"{where}.{head}")
    return dataclasses.replace(obj, **flat)
