"""Sensors for the owner's activity and the host's load.

Each seam is a `typing.Protocol` in `ports` (input listener, idle counter, host sensor);
`factory` picks an implementation for the running platform, importing platform modules
lazily and falling back to the `null` implementations, so nothing here raises at import.
`merge` combines the input listener and the idle counter into one `ActivityReading`.
"""
