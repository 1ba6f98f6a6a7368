"""Fixtures: a real kvtierd per test module, in a temporary directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
REPO = HERE.parents[2]

# Tests run against this source tree (ahead of any installed kvtier).
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


from kvtier.local_daemon import LocalDaemon, find_daemon  # noqa: E402


def daemon_binary():
    return find_daemon(str(REPO))


class Daemon(LocalDaemon):
    """The tests' kvtierd: a LocalDaemon in a folder named for pytest."""

    def __init__(self, binary: str, *args: str, directory: str = None):
        super().__init__(binary, *args, directory=directory, prefix="kvtier-pytest-")


def run_as_uid(uid: int, work, gid: int = None):
    """``work()`` in a forked child that drops to ``uid`` and primary group ``gid`` (default: the
    uid's number), no supplementary groups; returns its JSON-serialisable result, or
    ``{"failure": repr(exception)}``. Needs root."""
    gid = uid if gid is None else gid
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.write(w, json.dumps(work()).encode())
        except BaseException as e:
            os.write(w, json.dumps({"failure": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def binary():
    """The kvtierd binary; skips the test when it is not built."""
    b = daemon_binary()
    if b is None:
        pytest.skip("kvtierd is not built: run `swift build --product kvtierd` or set KVTIER_DAEMON")
    return b


@pytest.fixture(scope="module")
def start_daemon():
    """A factory: ``start_daemon("--ram-budget", "256MiB")``; stopped at the module's end."""
    binary = daemon_binary()
    if binary is None:
        pytest.skip("kvtierd is not built: run `swift build --product kvtierd` in the repository, "
                    "or set KVTIER_DAEMON to the binary")
    started = []

    def start(*args: str) -> Daemon:
        d = Daemon(binary, *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def daemon(start_daemon):
    return start_daemon("--ram-budget", "256MiB")
