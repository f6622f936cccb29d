"""X11 helpers for the tray tests: the tray host's selection, finding windows, clicking,
and screenshots (python-xlib GetImage → PNG written here, no image tool needed).

Plain module (not a conftest) so the e2e test and the benchmark share it.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from Xlib import X
from Xlib import display as xdisplay
from Xlib.error import BadWindow, XError

from tests.waiting import wait_for

TRAY_SELECTION = "_NET_SYSTEM_TRAY_S0"


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    width: int
    height: int

    @property
    def centre(self) -> tuple[int, int]:
        return self.x + self.width // 2, self.y + self.height // 2

    def grown(self, margin: int, limit: Box) -> Box:
        x, y = max(limit.x, self.x - margin), max(limit.y, self.y - margin)
        right = min(limit.x + limit.width, self.x + self.width + margin)
        bottom = min(limit.y + limit.height, self.y + self.height + margin)
        return Box(x, y, right - x, bottom - y)

    def union(self, other: Box) -> Box:
        x, y = min(self.x, other.x), min(self.y, other.y)
        right = max(self.x + self.width, other.x + other.width)
        bottom = max(self.y + self.height, other.y + other.height)
        return Box(x, y, right - x, bottom - y)


class X11:
    """One connection to `name` (e.g. ":90")."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.display = xdisplay.Display(name)
        self.root = self.display.screen().root

    def close(self) -> None:
        self.display.close()

    @property
    def screen_box(self) -> Box:
        geometry = self.root.get_geometry()
        return Box(0, 0, geometry.width, geometry.height)

    def tray_host_ready(self) -> bool:
        """True once a tray host owns the system-tray selection (wait for this before
        showing an icon, else Qt finds no tray)."""
        atom = self.display.intern_atom(TRAY_SELECTION)
        return self.display.get_selection_owner(atom) != X.NONE

    def _walk(self, window=None):  # type: ignore[no-untyped-def]
        window = window or self.root
        try:
            children = window.query_tree().children
        except (BadWindow, XError):
            return
        for child in children:
            yield child
            yield from self._walk(child)

    def _box(self, window) -> Box | None:  # type: ignore[no-untyped-def]
        try:
            geometry = window.get_geometry()
            attributes = window.get_attributes()
            origin = window.translate_coords(self.root, 0, 0)
        except (BadWindow, XError):
            return None
        if attributes.map_state != X.IsViewable:
            return None
        return Box(-origin.x, -origin.y, geometry.width, geometry.height)

    def embedded_icon(self, wm_class: str) -> Box | None:
        """Where the tray host shows the icon of the client with `wm_class`: a viewable
        window of that class whose parent is not the root (the host reparented it)."""
        for window in self._walk():
            try:
                classes = window.get_wm_class() or ()
                parent = window.query_tree().parent
            except (BadWindow, XError):
                continue
            if wm_class in classes and parent.id != self.root.id:
                box = self._box(window)
                if box is not None and box.width > 1:
                    return box
        return None

    def window_named(self, title: str) -> Box | None:
        """A viewable top-level window titled `title`."""
        found = self._window_named(title)
        return None if found is None else found[1]

    def focus(self, title: str) -> None:
        """Give the keyboard to the window titled `title` (there is no window manager
        to do it on a click)."""
        found = self._window_named(title)
        assert found is not None, f"no window {title!r}"
        self.xdotool("windowfocus", "--sync", str(found[0]))

    def _window_named(self, title: str) -> tuple[int, Box] | None:
        net_wm_name = self.display.intern_atom("_NET_WM_NAME")
        utf8 = self.display.intern_atom("UTF8_STRING")
        for window in self.root.query_tree().children:
            try:
                prop = window.get_full_property(net_wm_name, utf8)
            except (BadWindow, XError):
                continue
            name = prop.value.decode() if prop is not None else ""
            if name == title:
                box = self._box(window)
                if box is not None:
                    return window.id, box
        return None

    def popup_menus(self) -> list[Box]:
        """Viewable override-redirect top-level windows (Qt's popup menus)."""
        boxes = []
        for window in self.root.query_tree().children:
            try:
                attributes = window.get_attributes()
            except (BadWindow, XError):
                continue
            if attributes.override_redirect:
                box = self._box(window)
                if box is not None and box.width > 20 and box.height > 20:
                    boxes.append(box)
        return boxes

    def screenshot(self, path: Path, box: Box | None = None) -> Path:
        """Save the screen (or `box` of it) as a PNG."""
        box = box or self.screen_box
        image = self.root.get_image(box.x, box.y, box.width, box.height, X.ZPixmap, 0xFFFFFFFF)
        write_png(path, box.width, box.height, image.data)
        return path

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env={"DISPLAY": self.name}, check=True, timeout=10)

    def click(self, x: int, y: int, button: int = 1) -> None:
        self.xdotool("mousemove", str(x), str(y), "click", "--delay", "0", str(button))


def write_png(path: Path, width: int, height: int, bgrx: bytes) -> None:
    """A 24-bit RGB PNG from 32-bit BGRX pixels (X's ZPixmap at depth 24)."""
    rows = []
    stride = width * 4
    for y in range(height):
        row = bgrx[y * stride : (y + 1) * stride]
        rgb = bytearray(width * 3)
        rgb[0::3], rgb[1::3], rgb[2::3] = row[2::4], row[1::4], row[0::4]
        rows.append(b"\x00" + bytes(rgb))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def start_tray_host(display: str) -> subprocess.Popen[bytes]:
    """trayer on `display`, returned once it owns the tray selection."""
    process = subprocess.Popen(
        ["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
         "--height", "24", "--SetDockType", "true", "--transparent", "false",
         "--tint", "0xdddddd"],
        env={"DISPLAY": display},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    x11 = X11(display)
    try:
        wait_for(
            lambda: x11.tray_host_ready() or process.poll() is not None,
            15,
            "trayer to own the tray",
        )
    finally:
        x11.close()
    if process.poll() is not None:
        raise AssertionError(f"trayer exited with {process.returncode}")
    return process


def painted(x11: X11, box: Box, colours: int = 8) -> bool:
    """True once `box` shows at least `colours` distinct colours (a window that is
    mapped but not drawn yet is one flat colour)."""
    image = x11.root.get_image(box.x, box.y, box.width, box.height, X.ZPixmap, 0xFFFFFFFF)
    data = image.data
    seen = {data[i : i + 3] for i in range(0, len(data), 4 * 7)}
    return len(seen) >= colours


def colour_share(x11: X11, box: Box, rgb: tuple[int, int, int], tolerance: int = 40) -> float:
    """The share of `box`'s pixels within `tolerance` of `rgb` (per channel)."""
    image = x11.root.get_image(box.x, box.y, box.width, box.height, X.ZPixmap, 0xFFFFFFFF)
    data = image.data
    r, g, b = rgb
    close = sum(
        1
        for i in range(0, len(data), 4)
        if abs(data[i + 2] - r) <= tolerance
        and abs(data[i + 1] - g) <= tolerance
        and abs(data[i] - b) <= tolerance
    )
    return close / (box.width * box.height)
