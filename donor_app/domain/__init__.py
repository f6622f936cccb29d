"""The pure core: models and decisions. Standard library only, no I/O, no project imports."""
