"""`python -m donor_app.gui`: the tray (what autostart runs when no script exists)."""

from donor_app.gui.cli import main

raise SystemExit(main())
