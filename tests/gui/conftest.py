"""Qt tests run offscreen, against a real agent in the test's process (engine + local API
on a temp socket, libvirt's test:/// driver with one guest: tests/agent_in_process.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from datetime import datetime

import pytest

# Before any QApplication exists: no display needed, and Qt must not autolaunch a
# session bus per test.
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["DBUS_SESSION_BUS_ADDRESS"] = "disabled:"
# Qt's GLib event dispatcher takes GLib's default main context for the main thread;
# libvirt's event loop (GLib-based since libvirt 6.2) runs that same context on its own
# thread and would starve for the rest of the pytest process (the hypervisor contract
# suite's lifecycle events stopped arriving). The product never mixes the two in one
# process: the tray talks to the agent over its socket.
os.environ["QT_NO_GLIB"] = "1"

import shiboken6
from PySide6.QtCore import QObject
from PySide6.QtWidgets import QWidget
from pytestqt.qtbot import QtBot

from tests.agent_in_process import InProcessAgent, in_process_agent

MakeAgent = Callable[..., InProcessAgent]


def delete_now(*objects: QObject | None) -> None:
    """Close and delete these Qt objects now; ones already deleted (or None) are skipped.

    Left to Python, a widget the test created is deleted when its wrapper is freed: if the
    wrapper is caught in a reference cycle, that is whenever the cyclic garbage collector
    runs next, and a Python paintEvent allocates enough to start a collection. A widget
    deleted under an active QPainter (this one's dialog, or another top-level) kills the
    test process with a segmentation fault. Deleted here, it goes at a known point where
    no event handler runs; a wrapper collected later is only an empty shell.
    """
    for obj in objects:
        if obj is None or not shiboken6.isValid(obj):
            continue
        if isinstance(obj, QWidget):
            obj.close()
        shiboken6.delete(obj)


@pytest.fixture
def qtbot(qtbot: QtBot) -> Iterator[QtBot]:
    """pytest-qt's qtbot, but `addWidget` also holds the widget until the test's teardown
    and then deletes it with `delete_now` (pytest-qt holds widgets only weakly and leaves
    their deletion to Python)."""
    kept: list[QWidget] = []
    add = qtbot.addWidget

    def add_and_keep(
        widget: QWidget, *, before_close_func: Callable[[QWidget], None] | None = None
    ) -> None:
        add(widget, before_close_func=before_close_func)
        kept.append(widget)

    qtbot.addWidget = add_and_keep  # type: ignore[method-assign]
    yield qtbot
    delete_now(*reversed(kept))


@pytest.fixture
def make_agent() -> Iterator[MakeAgent]:
    """`make_agent(settings_toml="", fleet_toml="", history=[(when, cpu_s, gib_h)])`."""
    with ExitStack() as agents:

        def make(
            settings_toml: str = "idle_after = 1\n",
            fleet_toml: str = "",
            history: Sequence[tuple[datetime, float, float]] = (),
        ) -> InProcessAgent:
            return agents.enter_context(in_process_agent(settings_toml, fleet_toml, history))

        yield make


@pytest.fixture
def agent(make_agent: MakeAgent) -> InProcessAgent:
    return make_agent()
