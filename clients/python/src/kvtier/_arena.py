"""Checks on the arena descriptors a daemon passes at HELLO, before the client maps them."""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Optional

# Seals (fcntl F_GET_SEALS; constants from linux/fcntl.h where Python lacks them).
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


def arena_problem(fd: int, length: int, read_only: bool, what: str) -> Optional[str]:
    """Why an arena descriptor from the daemon must not be mapped, or None. Never trusts the
    peer: a memfd it could still shrink would kill this process with SIGBUS on the next access,
    and a page arena without F_SEAL_FUTURE_WRITE could be rewritten by other clients while we
    read it. The same checks as the Swift client's SharedArena.map."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        return f"the {what} descriptor cannot be examined: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"the {what} descriptor is not a memfd (not a regular file)"
    if st.st_size < length:
        return f"the {what} memfd holds {st.st_size} bytes, fewer than the {length} announced"
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as e:
        return f"the {what} memfd has no seals (F_GET_SEALS: {e.strerror or e})"
    if not seals & _F_SEAL_SHRINK:
        return f"the {what} memfd is not sealed against shrinking (F_SEAL_SHRINK), so it could be cut short under the mapping"
    if read_only and not seals & _F_SEAL_FUTURE_WRITE:
        return f"the {what} memfd is not sealed against writes (F_SEAL_FUTURE_WRITE), so other processes could change pages it serves"
    return None
