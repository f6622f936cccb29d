"""Editor for one `Caps` (CPU and memory while in use / while idle).

Used for the settings' default limits and for each schedule window's own limits. The
spin boxes hold any value the domain might reject (the dialog validates on save through
the domain, which names the field); a memory box at its minimum means "not set".
"""

from __future__ import annotations

from PySide6.QtWidgets import QDoubleSpinBox, QGridLayout, QLabel, QSpinBox, QWidget

from donor_app.domain.settings import Caps, Limits

NOT_SET = "—"
_SITUATIONS = (("in_use", "While you use it"), ("idle", "While idle"))
MAX_MIB = 16 * 1024 * 1024


class CapsEditor(QWidget):
    """Three rows (CPU %, memory % of RAM, memory MiB) × two columns (in use, idle)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for row, text in enumerate(
            ("CPU (% of the computer)", "Memory (% of RAM)", "Memory (MiB)")
        ):
            layout.addWidget(QLabel(text), row + 1, 0)
        self.cpu: dict[str, QDoubleSpinBox] = {}
        self.memory_percent: dict[str, QDoubleSpinBox] = {}
        self.memory_mib: dict[str, QSpinBox] = {}
        for column, (situation, title) in enumerate(_SITUATIONS, start=1):
            layout.addWidget(QLabel(f"<b>{title}</b>"), 0, column)
            cpu = _percent_box(allow_unset=False)
            percent = _percent_box(allow_unset=True)
            mib = QSpinBox()
            mib.setRange(-1, MAX_MIB)
            mib.setSpecialValueText(NOT_SET)
            mib.setSuffix(" MiB")
            for row, (key, box) in enumerate(
                (("cpu_percent", cpu), ("memory_percent", percent), ("memory_mib", mib)), start=1
            ):
                box.setObjectName(f"{situation}.{key}")
                layout.addWidget(box, row, column)
            self.cpu[situation], self.memory_percent[situation] = cpu, percent
            self.memory_mib[situation] = mib

    def set_caps(self, caps: Caps) -> None:
        for situation, limits in (("in_use", caps.in_use), ("idle", caps.idle)):
            self.cpu[situation].setValue(limits.cpu_percent)
            self.memory_percent[situation].setValue(
                -1 if limits.memory_percent is None else limits.memory_percent
            )
            self.memory_mib[situation].setValue(
                -1 if limits.memory_mib is None else limits.memory_mib
            )

    def caps(self) -> Caps:
        """The values shown (not validated: the Settings they go into validate them)."""
        return Caps(in_use=self._limits("in_use"), idle=self._limits("idle"))

    def _limits(self, situation: str) -> Limits:
        percent = self.memory_percent[situation].value()
        mib = self.memory_mib[situation].value()
        return Limits(
            cpu_percent=self.cpu[situation].value(),
            memory_mib=None if mib < 0 else mib,
            memory_percent=None if percent < 0 else percent,
        )

    def fields(self) -> dict[str, QWidget]:
        """Each box by its key relative to the caps ("idle.cpu_percent")."""
        boxes: dict[str, QWidget] = {}
        for situation, _ in _SITUATIONS:
            boxes[f"{situation}.cpu_percent"] = self.cpu[situation]
            boxes[f"{situation}.memory_percent"] = self.memory_percent[situation]
            boxes[f"{situation}.memory_mib"] = self.memory_mib[situation]
        return boxes


def _percent_box(*, allow_unset: bool) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(1)  # values written by hand (33.3 %) survive a round trip
    box.setSuffix(" %")
    if allow_unset:
        box.setRange(-1, 100)
        box.setSpecialValueText(NOT_SET)
    else:
        box.setRange(0, 100)
    return box
