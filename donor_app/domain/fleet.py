"""The fleet policy: bounds an administrator sets that the owner's settings cannot pass.

`clamp()` applies the bounds to the owner's settings (the policy decides on the clamped
settings); `locked_fields()` tells the tray which settings are bounded and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

from donor_app.domain.settings import (
    Caps,
    FieldError,
    Limits,
    Settings,
    Window,
    check_mib,
    check_no_overlap,
    check_percent,
)

_Number = TypeVar("_Number", int, float)


@dataclass(frozen=True, slots=True)
class FleetPolicy:
    """Bounds set by the site administrator. Validated on construction (`FieldError`).

    `max_cpu_percent`, `max_memory_mib`, `max_memory_percent` bound every cap (None: no
    memory bound). `blackout`: weekly windows in which donating is forbidden. With
    `owner_may_disable` false the owner cannot switch donating off (a snooze still
    works: the owner comes first). `reason` is shown next to every bounded setting.
    The default policy bounds nothing.
    """

    max_cpu_percent: float = 100.0
    max_memory_mib: int | None = None
    max_memory_percent: float | None = None
    blackout: tuple[Window, ...] = ()
    owner_may_disable: bool = True
    reason: str = "set by your administrator"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `FieldError` for the first invalid field."""
        check_percent("max_cpu_percent", self.max_cpu_percent)
        if self.max_memory_mib is not None:
            check_mib("max_memory_mib", self.max_memory_mib)
        if self.max_memory_percent is not None:
            check_percent("max_memory_percent", self.max_memory_percent)
        for index, window in enumerate(self.blackout):
            window.validate(f"blackout[{index}]")
        check_no_overlap(self.blackout, "blackout")
        if not self.reason.strip():
            raise FieldError("reason", "must not be empty (it is shown to the owner)")


def clamp(settings: Settings, fleet: FleetPolicy) -> Settings:
    """The owner's `settings` with every cap within the fleet's bounds, and donating
    switched on if the fleet does not let the owner switch it off."""
    return replace(
        settings,
        enabled=settings.enabled or not fleet.owner_may_disable,
        caps=_clamp_caps(settings.caps, fleet),
        schedule=tuple(
            entry if entry.caps is None else replace(entry, caps=_clamp_caps(entry.caps, fleet))
            for entry in settings.schedule
        ),
    )


def locked_fields(settings: Settings, fleet: FleetPolicy) -> dict[str, str]:
    """Field path → why the fleet bounds it, for every setting the fleet constrains.

    E.g. {"caps.idle.cpu_percent": "at most 50 % CPU — set by your administrator"}.
    "schedule" appears when blackout windows exist, "enabled" when the owner may not
    switch donating off. Memory bounds lock both memory fields (they combine).
    """
    locked: dict[str, str] = {}
    if not fleet.owner_may_disable:
        locked["enabled"] = f"donating cannot be switched off — {fleet.reason}"
    if fleet.blackout:
        hours = "; ".join(_describe_blackout(window) for window in fleet.blackout)
        locked["schedule"] = f"no donating {hours} — {fleet.reason}"
    memory = _memory_bound(fleet)
    for prefix in _caps_paths(settings):
        for situation in ("in_use", "idle"):
            path = f"{prefix}.{situation}"
            if fleet.max_cpu_percent < 100:
                locked[f"{path}.cpu_percent"] = (
                    f"at most {fleet.max_cpu_percent:g} % CPU — {fleet.reason}"
                )
            if memory:
                for field in ("memory_mib", "memory_percent"):
                    locked[f"{path}.{field}"] = f"at most {memory} — {fleet.reason}"
    return locked


def _clamp_caps(caps: Caps, fleet: FleetPolicy) -> Caps:
    return Caps(in_use=_clamp_limits(caps.in_use, fleet), idle=_clamp_limits(caps.idle, fleet))


def _clamp_limits(limits: Limits, fleet: FleetPolicy) -> Limits:
    # Memory caps combine as "the smaller wins", so bounding each unit separately is
    # exact without knowing the host's RAM.
    return Limits(
        cpu_percent=min(limits.cpu_percent, fleet.max_cpu_percent),
        memory_mib=_smaller(limits.memory_mib, fleet.max_memory_mib),
        memory_percent=_smaller(limits.memory_percent, fleet.max_memory_percent),
    )


def _smaller(value: _Number | None, bound: _Number | None) -> _Number | None:
    if value is None:
        return bound
    if bound is None:
        return value
    return min(value, bound)


def _caps_paths(settings: Settings) -> list[str]:
    """The field paths of every `Caps` in `settings`."""
    windows = enumerate(settings.schedule)
    return ["caps", *(f"schedule[{i}].caps" for i, entry in windows if entry.caps is not None)]


def _memory_bound(fleet: FleetPolicy) -> str:
    parts = []
    if fleet.max_memory_mib is not None:
        parts.append(f"{fleet.max_memory_mib} MiB")
    if fleet.max_memory_percent is not None:
        parts.append(f"{fleet.max_memory_percent:g} % of the RAM")
    return " and ".join(parts)


def _describe_blackout(window: Window) -> str:
    return f"{window.describe()} ({window.label})" if window.label else window.describe()
