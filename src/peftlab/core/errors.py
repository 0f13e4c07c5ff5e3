"""Exceptions that tell the user what to fix."""

from __future__ import annotations


class PeftlabError(Exception):
    """Base class of peftlab's own errors."""


class ConfigError(PeftlabError, ValueError):
    """A method configuration that cannot apply (unknown option, bad value, ...)."""


class TargetError(ConfigError):
    """A target specification that selects no module, or a module the method cannot adapt."""


class AdapterFileError(PeftlabError, ValueError):
    """An adapter file or directory that is missing, corrupt, or does not fit the model."""


class AdapterStateError(PeftlabError, RuntimeError):
    """An operation that does not fit the adapters' current state (unknown name, merged, ...)."""


class NonFiniteError(PeftlabError, FloatingPointError):
    """An operation whose result would hold NaN or inf (a merge that overflows the weight dtype)."""
