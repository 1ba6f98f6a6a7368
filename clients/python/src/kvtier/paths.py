"""Default locations, as the daemon computes them (Sources/KVTierCore/KVTierPaths.swift)."""

from __future__ import annotations

import os
from typing import Mapping, Optional


def default_state_dir(environ: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> str:
    """``$XDG_STATE_HOME/kvtier``, else ``/var/lib/kvtier`` as root, else ``~/.local/state/kvtier``."""
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    state = env.get("XDG_STATE_HOME", "")
    if state:
        return f"{state}/kvtier"
    if uid == 0:
        return "/var/lib/kvtier"
    home = env.get("HOME", "") or "/tmp"
    return f"{home}/.local/state/kvtier"


def default_socket_path(environ: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> str:
    """``$XDG_RUNTIME_DIR/kvtier/kvtierd.sock``; as root without ``XDG_RUNTIME_DIR`` and
    ``XDG_STATE_HOME``, ``/run/kvtier/kvtierd.sock`` (the systemd socket unit's); else
    ``<state dir>/kvtierd.sock``."""
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime:
        return f"{runtime}/kvtier/kvtierd.sock"
    if uid == 0 and not env.get("XDG_STATE_HOME", ""):
        return "/run/kvtier/kvtierd.sock"
    return f"{default_state_dir(env, uid)}/kvtierd.sock"
