"""Fleet guests' moves as the tray words them: the menu's "Recent moves" section and,
for guests here now, where they came from. Pure, like the presenter that uses it.

Ids are the coordinator's ("w-" or "d-" and 16 hex digits): shortened to what tells
them apart in a menu; times are the owner's local wall clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from donor_app.domain.status import AgentStatus, GuestMove

MOVES_SHOWN = 5  # lines under "Recent moves"
ORIGINS_SHOWN = 3  # "came from" header lines, for the guests here now
_DETAIL_CHARS = 60  # a coordinator's reason can be long; the menu is not the place


def moves_lines(status: AgentStatus, now: datetime) -> list[str]:
    """The menu's "Recent moves" section (empty without moves): fleet guests that came
    to this computer or left it, newest first."""
    if not status.moves:
        return []
    here = status.coordinator.donor_id
    return ["Recent moves", *(move_line(m, now, here) for m in status.moves[:MOVES_SHOWN])]


def move_line(move: GuestMove, now: datetime, here: str = "") -> str:
    """One move, e.g. "14:02 w-3f2a… arrived from d-91c0… (live)". `here` is this
    donor's id: a checkpoint taken here says so instead of naming this computer."""
    return f"{ago(move.at, now)} {short_id(move.guest)} {_what_happened(move, here)}"


def _what_happened(move: GuestMove, here: str) -> str:
    peer = short_id(move.peer)
    detail = f" ({_cut(move.detail)})" if move.detail else ""
    if move.event == "started":
        return f"started here{detail}"
    if move.event == "restored":
        if not move.peer:
            return f"restored from a checkpoint{detail}"
        where = "here" if move.peer == here else f"on {peer}"
        return f"restored from a checkpoint taken {where}{detail}"
    if move.event == "arrived":
        return f"arrived from {peer}{detail}" if move.peer else f"arrived{detail}"
    if move.event == "left":
        return f"left for {peer}{detail}" if move.peer else f"left{detail}"
    if move.event == "saved":
        return f"saved and handed to the coordinator{detail}"
    if move.event == "removed":
        return f"removed: {_cut(move.detail)}" if move.detail else "removed"
    # An event a newer agent knows and this tray does not: say it as it is.
    return " ".join(filter(None, [move.event, peer, detail.strip()]))


def origin_lines(status: AgentStatus) -> list[str]:
    """For guests on this computer now that came from another donor: from where."""
    latest: dict[str, GuestMove] = {}
    for move in status.moves:  # newest first: keep each guest's latest move
        latest.setdefault(move.guest, move)
    how = {"arrived": "live migration", "restored": "checkpoint"}
    lines = []
    for guest in status.guests:
        came = latest.get(guest.name)
        if came is None or came.event not in how or not came.peer:
            continue
        if came.peer == status.coordinator.donor_id:
            continue  # its own checkpoint, taken on this computer: it did not come from afar
        lines.append(f"{short_id(guest.name)} came from {short_id(came.peer)} ({how[came.event]})")
    return lines[:ORIGINS_SHOWN]


def short_id(identifier: str) -> str:
    """A fleet id cut to what tells guests apart in a menu: "w-3f2a9c…" → "w-3f2a…"."""
    prefix, dash, rest = identifier.partition("-")
    if dash and len(prefix) <= 2 and len(rest) > 6:
        return f"{prefix}-{rest[:4]}…"
    return _cut(identifier, 16)


def ago(moment: datetime, now: datetime) -> str:
    """When something happened: "14:02" today, "yesterday 14:02", "Mon 14:02" this
    week, the date before that."""
    local, today = moment.astimezone(now.tzinfo), now.date()
    if local.date() == today:
        return f"{local:%H:%M}"
    if local.date() == today - timedelta(days=1):
        return f"yesterday {local:%H:%M}"
    if local.date() > today - timedelta(days=7):
        return f"{local:%a %H:%M}"
    return f"{local:%Y-%m-%d}"


def _cut(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
