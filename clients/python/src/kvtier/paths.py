"""Default locations, as the daemon computes them (Sources/KVTierCore/KVTierPaths.swift).

There is no fallback into /tmp: a non-root process with none of ``XDG_RUNTIME_DIR``,
``XDG_STATE_HOME`` and ``HOME`` set to an absolute path gets ``NoDefaultPath``. A shared /tmp
path is one any local user can create first."""

from __future__ import annotations

import os
from typing import Mapping, Optional


class NoDefaultPath(ValueError):
    """No default location can be derived from the environment."""

    def __init__(self, what: str):
        super().__init__(
            f"no default {what}: none of XDG_RUNTIME_DIR, XDG_STATE_HOME and HOME is set to an absolute path, "
            "and KVTier never defaults into /tmp (any local user could create it first); set one of them, "
            "or pass the path (kvtierd --socket and --state-dir, or the socket path to the client)")


def _absolute(value: Optional[str]) -> Optional[str]:
    # An empty or relative value counts as unset (the XDG base directory specification).
    return value if value and value.startswith("/") else None


def default_state_dir(environ: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> str:
    """``$XDG_STATE_HOME/kvtier``, else ``/var/lib/kvtier`` as root, else ``~/.local/state/kvtier``;
    ``NoDefaultPath`` when none applies."""
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    state = _absolute(env.get("XDG_STATE_HOME"))
    if state:
        return f"{state}/kvtier"
    if uid == 0:
        return "/var/lib/kvtier"
    home = _absolute(env.get("HOME"))
    if home is None:
        raise NoDefaultPath("state directory")
    return f"{home}/.local/state/kvtier"


def default_socket_path(environ: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> str:
    """``$XDG_RUNTIME_DIR/kvtier/kvtierd.sock``; as root without ``XDG_RUNTIME_DIR`` and
    ``XDG_STATE_HOME``, ``/run/kvtier/kvtierd.sock`` (the systemd socket unit's); else
    ``<state dir>/kvtierd.sock``; ``NoDefaultPath`` when none applies."""
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    runtime = _absolute(env.get("XDG_RUNTIME_DIR"))
    if runtime:
        return f"{runtime}/kvtier/kvtierd.sock"
    if uid == 0 and not _absolute(env.get("XDG_STATE_HOME")):
        return "/run/kvtier/kvtierd.sock"
    try:
        return f"{default_state_dir(env, uid)}/kvtierd.sock"
    except NoDefaultPath:
        raise NoDefaultPath("socket path") from None
