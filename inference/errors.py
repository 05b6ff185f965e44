"""Errors of the inference package that reach users."""

from __future__ import annotations


class ModelUnavailable(Exception):
    """A model cannot be loaded for a reason the user must fix; the message is
    one line that names the problem and the fix."""
