"""Alembic revisions of the fleet store, oldest first by `down_revision` (see ../../migrate.py)."""
