"""Named errors raised by engine code; the service edges map them to status codes (one mapping)."""

from __future__ import annotations


class RalmError(Exception):
    """Base of every error a caller is meant to see (message written for a person)."""


class InvalidRequest(RalmError, ValueError):
    """Bad input: maps to INVALID_ARGUMENT."""


class NotFound(RalmError, LookupError):
    """A named thing (session, passage, asset) does not exist: maps to NOT_FOUND."""


class Overloaded(RalmError):
    """Back-pressure: maps to RESOURCE_EXHAUSTED."""


class Unavailable(RalmError):
    """A dependency is down or an asset is missing: maps to UNAVAILABLE."""


class DeadlineExceeded(RalmError, TimeoutError):
    """The caller's deadline passed before a reply came: maps to DEADLINE_EXCEEDED."""
