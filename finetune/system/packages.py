"""Installed package versions, read from their metadata without importing them (torch takes seconds)."""

from __future__ import annotations

import importlib.metadata


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
