"""The tray's SVG icons, loaded from the package (`donor_app/gui/resources/`).

Read through importlib.resources so an installed wheel finds them as well as a source
checkout, and rendered with QSvgRenderer at the usual tray sizes, so neither a file
path nor Qt's SVG icon-engine plugin is needed at run time.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from PySide6.QtCore import QByteArray, Qt
from PySide6.QtGui import QIcon, QPainter, QPixmap
from PySide6.QtSvg import QSvgRenderer

from donor_app.gui.presenter import TrayState

APP_ICON = "donor-app"
_SIZES = (16, 22, 24, 32, 48, 64)


def svg_bytes(name: str) -> bytes:
    """The SVG source of icon `name` (a `TrayState` value or `APP_ICON`)."""
    return resources.files("donor_app.gui").joinpath("resources", f"{name}.svg").read_bytes()


@cache
def icon(name: str) -> QIcon:
    """Icon `name` rendered at each tray size (cached: the tray switches often)."""
    renderer = QSvgRenderer(QByteArray(svg_bytes(name)))
    if not renderer.isValid():
        raise ValueError(f"icon {name}: not a valid SVG")
    result = QIcon()
    for size in _SIZES:
        pixmap = QPixmap(size, size)
        pixmap.fill(Qt.GlobalColor.transparent)
        painter = QPainter(pixmap)
        renderer.render(painter)
        painter.end()
        result.addPixmap(pixmap)
    return result


def state_icon(state: TrayState) -> QIcon:
    return icon(state.value)
