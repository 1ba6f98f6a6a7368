"""Errors raised by the kvtier client."""

from __future__ import annotations

from typing import Optional

# Wire error codes (docs/protocol.md, "Error codes").
ERROR_NAMES = {
    1: "malformed",
    2: "unsupportedVersion",
    3: "tooLarge",
    4: "unknownOpcode",
    5: "notFound",
    6: "permissionDenied",
    7: "overBudget",
    8: "invalidArgument",
    9: "outOfOrder",
    10: "internal",
    11: "unavailable",
    12: "timeout",
}

# Error replies after which the daemon closes the connection (the stream cannot be trusted).
CLOSING_CODES = frozenset({"malformed", "tooLarge", "timeout"})


class KVTierError(Exception):
    """An operation failed.

    ``code`` is the daemon's error name (``"notFound"``, ``"invalidArgument"``, ...) or, for
    failures the client detects itself, ``"connectionClosed"`` / ``"protocol"``;
    ``status`` is the numeric wire code (0 for client-side failures); ``message`` is the
    daemon's own explanation.
    """

    def __init__(self, code: str, message: str, status: int = 0, opcode: Optional[int] = None):
        self.code = code
        self.message = message
        self.status = status
        self.opcode = opcode
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_status(cls, status: int, message: str, opcode: Optional[int] = None) -> "KVTierError":
        return cls(ERROR_NAMES.get(status, f"error{status}"), message, status, opcode)


class KVTierConnectionError(KVTierError, ConnectionError):
    """The connection to kvtierd is gone (daemon stopped, socket closed, fork, timeout)."""

    def __init__(self, message: str):
        super().__init__("connectionClosed", message)


class ProtocolViolation(KVTierError):
    """A reply did not follow the protocol; the connection is closed after this."""

    def __init__(self, message: str):
        super().__init__("protocol", message)
