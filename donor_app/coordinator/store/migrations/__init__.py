"""Alembic environment and revisions of the fleet store (see ../migrate.py)."""
