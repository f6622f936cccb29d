"""Fills a QMenu from the presenter's entries (the menu is rebuilt on each aboutToShow)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PySide6.QtWidgets import QMenu

from donor_app.gui.presenter import Action, MenuEntry


def fill_menu(
    menu: QMenu, entries: Sequence[MenuEntry], on_action: Callable[[Action], None]
) -> None:
    """Replace `menu`'s rows with `entries`; choosing one calls `on_action(action)`."""
    menu.clear()
    for entry in entries:
        if entry.is_separator:
            menu.addSeparator()
            continue
        if entry.action is None:
            # A header line: '&' is literal text here, not a mnemonic.
            row = menu.addAction(entry.text.replace("&", "&&"))
            row.setEnabled(False)
            continue
        action = entry.action
        row = menu.addAction(entry.text)
        row.setEnabled(entry.enabled)
        row.setObjectName(action.value)
        row.triggered.connect(lambda _checked=False, a=action: on_action(a))
