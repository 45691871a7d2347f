"""Experiments measured with `clip-bench compare --import-path ...`: proposed service changes, not the service."""
