"""Settings field paths ("schedule[1].caps.idle.cpu_percent") in words. Pure.

The settings dialog names a field in the owner's words and in the settings file's key,
so the same mistake reads the same in the dialog, the agent's refusal and the file.
"""

from __future__ import annotations

import re

_WORDS = {
    "enabled": "Donate this computer",
    "caps": "Limits",
    "in_use": "while you use the computer",
    "idle": "while the computer is idle",
    "cpu_percent": "CPU %",
    "memory_percent": "memory %",
    "memory_mib": "memory MiB",
    "idle_after": "Idle after",
    "evacuate_after": "Move guests away after",
    "checkpoint_after": "Save guests to disk after",
    "pause_on_battery": "Pause on battery",
    "pause_on_heat": "Pause when hot",
    "max_temperature_c": "Maximum temperature °C",
    "owner_load": "Your own load",
    "days": "days",
    "start": "start",
    "end": "end",
    "label": "label",
    "toml": "settings",
}
_INDEXED = re.compile(r"(\w+)\[(\d+)\]")


def describe(path: str) -> str:
    """`path` in words, e.g. "Schedule window 2 › Limits › while idle › CPU %"."""
    words = []
    for part in path.split("."):
        match = _INDEXED.fullmatch(part)
        if match and match.group(1) == "schedule":
            words.append(f"Schedule window {int(match.group(2)) + 1}")
        elif part == "schedule":
            words.append("Schedule")
        else:
            words.append(_WORDS.get(part, part.replace("_", " ")))
    return " › ".join(words)


def explain(message: str) -> str:
    """An error "path: reason" (FieldError, ConfigError or the agent's refusal) as
    "Words (path): reason"; other messages unchanged."""
    path, sep, reason = message.partition(": ")
    if not sep or " " in path:
        return message
    return f"{describe(path)} ({path}): {reason}"
