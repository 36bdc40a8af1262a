"""Protocol errors, split by who broke the rules (the h11 convention)."""

from __future__ import annotations


class ProtocolError(Exception):
    """The conversation cannot go on as the spec describes."""


class LocalProtocolError(ProtocolError):
    """We (the application driving the state machine) asked for something invalid."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes the spec does not allow; the connection must be dropped."""
