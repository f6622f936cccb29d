"""Tests. Importing donor_app first applies its process settings (see donor_app/__init__)."""

import donor_app  # noqa: F401
