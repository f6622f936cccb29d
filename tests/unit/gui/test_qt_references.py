"""The installed Qt binding keeps Python's reference counts straight.

PySide6 6.12.0 on Python 3.11 took a reference from None with every call returning None
and from True with every signal emitted; a tray calling Qt a few times a second then
aborted after hours with "Fatal Python error: none_dealloc". A leak of one reference per
call shows here as a drop of thousands.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QApplication, QWidget

CALLS = 2_000


class _Emitter(QObject):
    changed = Signal(int)


def test_calls_returning_none_and_signals_keep_their_references() -> None:
    app = QApplication.instance() or QApplication([])
    widget = QWidget()
    emitter = _Emitter()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(CALLS):
        widget.update()
        emitter.changed.emit(1)
    none_lost = none_before - sys.getrefcount(None)
    true_lost = true_before - sys.getrefcount(True)
    assert none_lost < CALLS // 2, f"{none_lost} references to None lost in {CALLS} calls"
    assert true_lost < CALLS // 2, f"{true_lost} references to True lost in {CALLS} emits"
    widget.deleteLater()
    app.processEvents()
