"""Datasets that ship with the project's dependencies (no downloads)."""
