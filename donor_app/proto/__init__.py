"""Wire types (generated under v1/) and serde.py, the one place that converts them."""
