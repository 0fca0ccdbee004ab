"""The error types that modules at every level raise; this module imports nothing of the package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""
