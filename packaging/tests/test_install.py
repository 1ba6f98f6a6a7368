"""Installing KVTier: scripts/install and scripts/uninstall into a staging folder (--destdir), and
the .deb of scripts/package-deb installed on this machine with dpkg, serving a client, then removed
and purged.

The .deb test changes the machine (it is what the package is for): it needs root and dpkg, and
skips, saying why, without them or where a KVTier is installed already. It leaves the machine as
it found it: the package purged, and the kvtier user deleted when the test created it.

Both tests reuse the release build when it is current (scripts/test builds it first); otherwise
the scripts build it, which takes minutes on a small machine.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A release build from scratch takes ~10 min on two loaded cores; only that reaches this.
BUILD_TIMEOUT_SECONDS = 1800
# Only a stuck daemon reaches this; a loaded two-core machine starts one in a few seconds.
READY_DEADLINE_SECONDS = 120


def run(*argv, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Runs argv in the repository; a failure shows its output."""
    result = subprocess.run([str(a) for a in argv], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def files_under(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def source_version() -> str:
    return run(REPO / "scripts/version").stdout.strip()


# --------------------------------------------------------------------------- scripts/install


def test_install_and_uninstall_in_a_destdir(tmp_path):
    stage = tmp_path / "stage"
    run(REPO / "scripts/install", "--prefix", "/opt/kvtier", "--destdir", stage,
        "--python-dir", "/opt/kvtier/lib/python", timeout=BUILD_TIMEOUT_SECONDS)

    # Binaries, executable by all, of this checkout's version.
    for name in ("kvtierd", "kvtier"):
        binary = stage / "opt/kvtier/bin" / name
        assert mode(binary) == 0o755, f"{binary}: {oct(mode(binary))}"
        assert run(binary, "--version").stdout.strip() == source_version()

    # Units in the directory systemd reads for a prefix it does not search, starting this prefix's
    # kvtierd; nothing else in them changed.
    service = stage / "etc/systemd/system/kvtierd.service"
    text = service.read_text()
    assert "ExecStart=/opt/kvtier/bin/kvtierd --config /etc/kvtier/kvtierd.json " in text
    assert "/usr/local" not in text
    original = (REPO / "systemd/kvtierd.service").read_text()
    assert text == original.replace("/usr/local/bin/kvtierd", "/opt/kvtier/bin/kvtierd")
    assert (stage / "etc/systemd/system/kvtierd.socket").read_text() == (REPO / "systemd/kvtierd.socket").read_text()

    # The user, the state directories with their modes, and the configuration.
    assert "u kvtier - " in (stage / "etc/sysusers.d/kvtier.conf").read_text()
    tmpfiles = (stage / "etc/tmpfiles.d/kvtier.conf").read_text().splitlines()
    assert "d /var/lib/kvtier 0750 kvtier kvtier -" in tmpfiles
    assert "d /run/kvtier 0755 kvtier kvtier -" in tmpfiles
    config = stage / "etc/kvtier/kvtierd.json"
    effective = json.loads(run(stage / "opt/kvtier/bin/kvtierd", "--config", config, "--print-config").stdout)
    assert effective["ramBudget"] == json.loads(config.read_text())["ramBudget"] == "8GiB"
    for data in ("etc/systemd/system/kvtierd.service", "etc/systemd/system/kvtierd.socket",
                 "etc/sysusers.d/kvtier.conf", "etc/tmpfiles.d/kvtier.conf", "etc/kvtier/kvtierd.json"):
        assert mode(stage / data) == 0o644, f"{data}: {oct(mode(stage / data))}"

    # Completions for both binaries in three shells, from swift-argument-parser.
    share = stage / "opt/kvtier/share"
    for name in ("kvtierd", "kvtier"):
        assert f"_{name}" in (share / "bash-completion/completions" / name).read_text()
        assert (share / "zsh/site-functions" / f"_{name}").read_text().startswith(f"#compdef {name}")
        assert f"complete -c '{name}'" in (share / f"fish/vendor_completions.d/{name}.fish").read_text()

    # The Python client, importable from where it went.
    python_dir = stage / "opt/kvtier/lib/python"
    imported = run(sys.executable, "-c", "import kvtier; print(kvtier.__file__)",
                   env=dict(os.environ, PYTHONPATH=str(python_dir), PYTHONDONTWRITEBYTECODE="1"))
    assert imported.stdout.strip() == str(python_dir / "kvtier/__init__.py")

    # Nothing outside the prefix's and the system's configuration paths: no state, no runtime
    # directory, no user (those need the real system, and --destdir touches only DIR).
    assert sorted(p.name for p in stage.iterdir()) == ["etc", "opt"]

    # An upgrade keeps an edited configuration.
    config.write_text('{"ramBudget": "2GiB"}\n')
    run(REPO / "scripts/install", "--prefix", "/opt/kvtier", "--destdir", stage,
        "--python-dir", "/opt/kvtier/lib/python", timeout=BUILD_TIMEOUT_SECONDS)
    assert config.read_text() == '{"ramBudget": "2GiB"}\n'

    # Uninstall keeps the edited configuration and the state; --purge removes them too. Of the
    # directories, only those an install made go: here the install after the first uninstall
    # found etc/ and var/lib/ (kept configuration and state) and made the rest.
    state = stage / "var/lib/kvtier/store/segment-0"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"pages")
    run(REPO / "scripts/uninstall", "--prefix", "/opt/kvtier", "--destdir", stage)
    assert files_under(stage) == ["etc/kvtier/kvtierd.json", "var/lib/kvtier/store/segment-0"]
    # The manifest went with the first uninstall, so a second one says nothing is installed.
    again = subprocess.run([REPO / "scripts/uninstall", "--prefix", "/opt/kvtier", "--destdir", stage],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "manifest is missing" in again.stderr
    run(REPO / "scripts/install", "--prefix", "/opt/kvtier", "--destdir", stage,
        "--python-dir", "/opt/kvtier/lib/python", timeout=BUILD_TIMEOUT_SECONDS)
    run(REPO / "scripts/uninstall", "--prefix", "/opt/kvtier", "--destdir", stage, "--purge")
    assert sorted(str(p.relative_to(stage)) for p in stage.rglob("*")) == ["etc", "var", "var/lib"]


# --------------------------------------------------------------------------- the .deb


def installed_package_state(name: str) -> str:
    """dpkg's status of `name` ("install ok installed", "deinstall ok config-files"), or ""."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def deb_skip_reason():
    if not shutil.which("dpkg") or not shutil.which("dpkg-deb"):
        return "dpkg and dpkg-deb are needed (a Debian or Ubuntu machine)"
    if os.geteuid() != 0:
        return "dpkg -i needs root (CI runs the tests as root)"
    if installed_package_state("kvtier"):
        return f"a kvtier package is on this machine ({installed_package_state('kvtier')}); the test would replace and purge it"
    for path in ("/usr/bin/kvtierd", "/usr/bin/kvtier"):
        if os.path.lexists(path):
            return f"{path} exists (installed by hand?); the test's dpkg -r would delete it"
    return None


class InstalledDaemon:
    """/usr/bin/kvtierd started directly as the kvtier user, on a socket in a folder of its own,
    ready once it sends READY=1 to a NOTIFY_SOCKET of ours (that is, once its socket listens)."""

    def __init__(self, user: pwd.struct_passwd):
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-deb-"))
        os.chmod(self.dir, 0o755)
        os.chown(self.dir, user.pw_uid, user.pw_gid)  # the socket's folder must be the daemon's
        self.socket = self.dir / "kvtierd.sock"
        self.log = open(self.dir / "kvtierd.log", "w+")
        notify_path = str(self.dir / "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        os.chmod(notify_path, 0o666)  # the daemon, not root, sends to it
        try:
            env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify_path}
            self.proc = subprocess.Popen(
                ["/usr/bin/kvtierd", "--socket", str(self.socket), "--state-dir", str(self.dir / "state"),
                 "--ram-budget", "64MiB"],
                stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            exited = os.pidfd_open(self.proc.pid)
            try:
                deadline = time.monotonic() + READY_DEADLINE_SECONDS
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.stop()
                        pytest.fail(f"kvtierd sent no READY=1 within {READY_DEADLINE_SECONDS} s: {self.log_text()}")
                    ready, _, _ = select.select([notify, exited], [], [], left)
                    if notify in ready and b"READY=1" in notify.recv(4096):
                        return
                    if exited in ready:
                        self.proc.wait()
                        pytest.fail(f"kvtierd exited {self.proc.returncode} before READY=1: {self.log_text()}")
            finally:
                os.close(exited)
        finally:
            notify.close()

    def log_text(self) -> str:
        self.log.flush()
        return (self.dir / "kvtierd.log").read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=READY_DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.skipif(deb_skip_reason() is not None, reason=deb_skip_reason() or "")
def test_deb_installs_serves_and_purges(tmp_path):
    result = run(REPO / "scripts/package-deb", "--out", tmp_path, timeout=BUILD_TIMEOUT_SECONDS)
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb.parent == tmp_path and deb.name.endswith(".deb"), result.stdout
    fields = {name: run("dpkg-deb", "--field", deb, name).stdout.strip()
              for name in ("Package", "Version", "Depends", "Recommends")}
    assert fields["Package"] == "kvtier"
    for library in ("liblz4-1", "libzstd1", "liburing2"):
        assert library in fields["Depends"], fields["Depends"]
    assert "python3-numpy" in fields["Recommends"]
    assert fields["Version"] == run(REPO / "scripts/version", "--debian").stdout.strip()

    user_existed = True
    try:
        pwd.getpwnam("kvtier")
    except KeyError:
        user_existed = False
    try:
        run("dpkg", "-i", deb)
        assert installed_package_state("kvtier") == "install ok installed"
        files = [Path(line) for line in run("dpkg", "-L", "kvtier").stdout.splitlines()]
        package_files = [path for path in files if path.is_file()]
        for path in files:
            assert path.exists(), f"dpkg -L lists {path}, which is missing"
        for path in ("/usr/bin/kvtierd", "/usr/bin/kvtier", "/etc/kvtier/kvtierd.json",
                     "/usr/lib/python3/dist-packages/kvtier/__init__.py",
                     "/usr/share/bash-completion/completions/kvtier"):
            assert Path(path) in package_files, f"{path} is not in the package"
        units = [path for path in package_files if path.name == "kvtierd.service"]
        assert len(units) == 1 and "ExecStart=/usr/bin/kvtierd " in units[0].read_text()

        # postinst: the user and group, the state directory theirs and closed to others.
        user = pwd.getpwnam("kvtier")
        assert grp.getgrgid(user.pw_gid).gr_name == "kvtier"
        assert user.pw_uid < 1000, f"kvtier should be a system user, has uid {user.pw_uid}"
        state = os.stat("/var/lib/kvtier")
        assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (user.pw_uid, 0o750)

        assert run("/usr/bin/kvtierd", "--version").stdout.strip() == source_version()
        assert run("/usr/bin/kvtier", "--version").stdout.strip() == source_version()

        # The installed binaries serve: kvtierd as kvtier, kvtier status and the installed Python
        # client as root (another tenant, as on a real host).
        daemon = InstalledDaemon(user)
        try:
            status = json.loads(run("/usr/bin/kvtier", "status", "--socket", daemon.socket, "--json").stdout)
            assert "tiers" in status and "sessions" in status, status
            client = run(sys.executable, "-c",
                         "import sys; sys.path.insert(0, '/usr/lib/python3/dist-packages'); import kvtier; "
                         "kvtier.Client(sys.argv[1]).ping(); print(kvtier.__file__)", daemon.socket)
            assert client.stdout.strip() == "/usr/lib/python3/dist-packages/kvtier/__init__.py"
        finally:
            daemon.stop()

        # Installing again is an upgrade (prerm upgrade, postinst configure with the old version).
        run("dpkg", "-i", deb)
        assert installed_package_state("kvtier") == "install ok installed"

        # dpkg -r: the files go (byte code the client left included); configuration and state stay.
        run("dpkg", "-r", "kvtier")
        assert installed_package_state("kvtier") == "deinstall ok config-files"
        left = [path for path in package_files if path.exists()]
        assert left == [Path("/etc/kvtier/kvtierd.json")], f"left after dpkg -r: {left}"
        assert not Path("/usr/lib/python3/dist-packages/kvtier").exists()
        assert Path("/var/lib/kvtier").is_dir()

        # dpkg -P: the configuration and the state go too.
        run("dpkg", "-P", "kvtier")
        assert installed_package_state("kvtier") == ""
        for path in ("/etc/kvtier", "/var/lib/kvtier", "/run/kvtier"):
            assert not Path(path).exists(), f"{path} is left after dpkg -P"
    finally:
        if installed_package_state("kvtier"):
            subprocess.run(["dpkg", "-P", "kvtier"], capture_output=True)
        if not user_existed:
            subprocess.run(["userdel", "kvtier"], capture_output=True)
            subprocess.run(["groupdel", "kvtier"], capture_output=True)
