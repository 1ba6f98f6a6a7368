"""Fixtures: a real kvtierd per test module, in a temporary directory."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
REPO = HERE.parents[2]

# Tests run against this source tree (ahead of any installed kvtier).
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


# Only a stuck daemon reaches this; a loaded two-core machine starts one in a few seconds.
READY_DEADLINE_SECONDS = 120


def daemon_binary():
    env = os.environ.get("KVTIER_DAEMON")
    if env:
        return env if os.access(env, os.X_OK) else None
    for build in ("debug", "release"):
        candidate = REPO / ".build" / build / "kvtierd"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class Daemon:
    """A kvtierd in a fresh temporary folder, or in `directory` (a restart on an earlier
    daemon's socket path and state)."""

    def __init__(self, binary: str, *args: str, directory: str = None):
        self.dir = directory or tempfile.mkdtemp(prefix="kvtier-pytest-")
        os.chmod(self.dir, 0o755)  # another uid must reach the socket (test_other_uid)
        self.socket = os.path.join(self.dir, "s.sock")
        self.log = open(os.path.join(self.dir, "kvtierd.log"), "w+")
        self.argv = [binary, "--socket", self.socket, "--state-dir", os.path.join(self.dir, "state"), *args]
        self._launch()

    def _launch(self) -> None:
        """Starts kvtierd and waits for READY=1 on a NOTIFY_SOCKET of our own (sent once the
        socket listens): event-driven, with a deadline only a stuck daemon reaches, so a
        loaded machine is slow here but never fails."""
        notify_path = os.path.join(self.dir, f"notify-{os.getpid()}-{time.monotonic_ns()}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        try:
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            env.pop("WATCHDOG_USEC", None)
            self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
            exited = os.pidfd_open(self.proc.pid) if hasattr(os, "pidfd_open") else None
            try:
                deadline = time.monotonic() + READY_DEADLINE_SECONDS
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log = self.log_text()
                        self.stop()
                        raise RuntimeError(f"kvtierd sent no READY=1 within {READY_DEADLINE_SECONDS} s: {log}")
                    waiting = [notify] + ([exited] if exited is not None else [])
                    # Without a pidfd, look at the process every second.
                    ready, _, _ = select.select(waiting, [], [], left if exited is not None else min(left, 1.0))
                    if notify in ready and b"READY=1" in notify.recv(4096):
                        return
                    if self.proc.poll() is not None:
                        log = self.log_text()
                        self.stop()
                        raise RuntimeError(f"kvtierd exited ({self.proc.returncode}) before READY=1: {log}")
            finally:
                if exited is not None:
                    os.close(exited)
        finally:
            notify.close()
            os.unlink(notify_path)

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Stops the daemon with SIGTERM and starts it again on the same state directory: its
        RAM tier starts empty, so cached pages come back from the disk tier."""
        self._terminate()
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self._launch()

    def stop(self) -> None:
        self._terminate()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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
