"""Default paths never fall back into /tmp (finding 9): the rules match KVTierPaths.swift."""

from __future__ import annotations

import pytest

import kvtier


@pytest.mark.parametrize("env", [{}, {"HOME": ""}, {"HOME": "relative"}, {"XDG_STATE_HOME": "", "XDG_RUNTIME_DIR": ""}])
def test_no_default_into_tmp(env):
    with pytest.raises(kvtier.NoDefaultPath, match="never defaults into /tmp"):
        kvtier.default_state_dir(env, 1000)
    with pytest.raises(kvtier.NoDefaultPath, match="XDG_RUNTIME_DIR"):
        kvtier.default_socket_path(env, 1000)


def test_defaults_that_remain():
    assert kvtier.default_state_dir({}, 0) == "/var/lib/kvtier"
    assert kvtier.default_socket_path({}, 0) == "/run/kvtier/kvtierd.sock"
    assert kvtier.default_socket_path({"XDG_RUNTIME_DIR": "/run/user/5"}, 5) == "/run/user/5/kvtier/kvtierd.sock"
    assert kvtier.default_state_dir({"HOME": "/h"}, 5) == "/h/.local/state/kvtier"


def test_client_without_a_default_fails_clearly(monkeypatch):
    for name in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.getuid", lambda: 1000)
    with pytest.raises(kvtier.NoDefaultPath, match="socket path"):
        kvtier.Client()
