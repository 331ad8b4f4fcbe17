"""Errors of the ground role that are not configuration errors (those are `emsfl.config.ConfigError`)."""

from __future__ import annotations


class GroundError(ValueError):
    """Bad input to the ground role (a checkpoint of another family, an impossible assignment, ...)."""
