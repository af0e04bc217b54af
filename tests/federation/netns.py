"""Several "hosts" on one Linux machine: network namespaces joined by veth links (`ip netns`, root only).

One hub namespace (the coordinator) and one namespace per spoke (the sites, an outsider), each
spoke on a point-to-point link of its own::

    coord       lo 127.0.0.1 and 10.77.0.1/32 (the coordinator's address, on every link's route)
      v1 10.77.1.1/30 ── veth ── siteA: eth0 10.77.1.2/30, default route via 10.77.1.1
      v2 10.77.2.1/30 ── veth ── siteB: eth0 10.77.2.2/30, ...
      ...

IP forwarding is off in ``coord`` (a new namespace's default), so a spoke reaches the coordinator
but no other spoke. The addresses are the same in every run: they exist only inside the run's own
namespaces, whose names carry a random suffix so that parallel runs do not clash.
``Testbed.close`` kills every process inside the namespaces (``ip netns pids``, which also finds
the ``flower-superexec`` children that leave our process groups) and deletes them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedrad.server.local import signal_group, signal_process

__all__ = ["Testbed", "NetnsError", "unavailable", "COORDINATOR"]

#: the coordinator's address, reachable from every spoke
COORDINATOR = "10.77.0.1"

#: connect to host:port; print open | refused | timeout | unreachable (errno)
_PROBE = """
import socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + wait
while True:
    try:
        socket.create_connection((host, port), timeout=min(1.5, max(0.1, wait))).close()
        print("open"); break
    except ConnectionRefusedError:
        outcome = "refused"
    except (TimeoutError, socket.timeout):
        outcome = "timeout"
    except OSError as exc:
        outcome = f"unreachable ({exc.errno})"
    if time.monotonic() >= deadline:
        print(outcome); break
    time.sleep(0.2)
"""


class NetnsError(RuntimeError):
    """An `ip` command failed while building or tearing down the namespaces."""


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not Linux, not root, no `ip netns`), or None."""
    need = "needs root and `ip netns`: creates network namespaces"
    if not sys.platform.startswith("linux"):
        return f"{need} (Linux only; this is {sys.platform})"
    if os.geteuid() != 0:
        return f"{need} (not running as root)"
    if shutil.which("ip") is None:
        return f"{need} (iproute2's `ip` is not installed)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, encoding="utf-8")
    if probe.returncode != 0:
        return f"{need} (`ip netns list` failed: {probe.stderr.strip()})"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


class Testbed:
    """A hub namespace ``hub`` and one spoke namespace per name in ``spokes``; a context manager.

    ``address[name]`` is each namespace's address; ``spawn``/``run``/``reach`` run commands inside one.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, spokes: list[str], *, hub: str = "coord", prefix: str = "fedrad"):
        suffix = secrets.token_hex(3)
        self.hub = hub
        self.spokes = list(spokes)
        self.names = {role: f"{prefix}-{suffix}-{role}" for role in [hub, *self.spokes]}
        self.address = {hub: COORDINATOR, **{s: f"10.77.{i}.2" for i, s in enumerate(self.spokes, start=1)}}
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    def __enter__(self) -> "Testbed":
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> None:
        for name in self.names.values():
            _ip("netns", "add", name)
            self._created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        hub = self.names[self.hub]
        _ip("-n", hub, "addr", "add", f"{COORDINATOR}/32", "dev", "lo")
        for i, spoke in enumerate(self.spokes, start=1):
            name, link = self.names[spoke], f"v{i}"
            _ip("link", "add", link, "netns", hub, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("-n", hub, "addr", "add", f"10.77.{i}.1/30", "dev", link)
            _ip("-n", hub, "link", "set", link, "up")
            _ip("-n", name, "addr", "add", f"10.77.{i}.2/30", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "route", "add", "default", "via", f"10.77.{i}.1")

    def argv(self, role: str, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[role], *map(str, command)]

    def spawn(self, role: str, command: list[str], *, log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``command`` inside ``role``'s namespace, output to ``log``; ``close`` stops it."""
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(self.argv(role, command), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.processes.append(proc)
        return proc

    def run(self, role: str, command: list[str], *, timeout: float, env: dict | None = None,
            log: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``command`` inside ``role``'s namespace to its end (killed after ``timeout`` s); output as text,
        also written to ``log``."""
        if log:
            proc = self.spawn(role, command, log=log, env=env)
        else:
            proc = subprocess.Popen(self.argv(role, command), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                    start_new_session=True)
            self.processes.append(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.communicate()
            self.processes.remove(proc)
            raise
        self.processes.remove(proc)  # on any other exception it stays, for close() to stop
        if log:
            out = Path(log).read_text(encoding="utf-8", errors="replace")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    def reach(self, role: str, host: str, port: int, *, wait: float = 0.0) -> str:
        """From inside ``role``: 'open', 'refused' (the host answered), 'timeout' or 'unreachable (errno)';
        with ``wait`` > 0, retry until 'open' or ``wait`` seconds have passed."""
        proc = subprocess.run(self.argv(role, [sys.executable, "-S", "-c", _PROBE, host, str(port), str(wait)]),
                              capture_output=True, text=True, timeout=wait + 30, encoding="utf-8")
        return proc.stdout.strip() or f"probe failed: {proc.stderr.strip()}"

    def pids(self) -> list[int]:
        """Every process inside our namespaces."""
        found = []
        for name in self._created:
            proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, encoding="utf-8")
            found += [int(p) for p in proc.stdout.split()]
        return found

    def close(self, grace_s: float = 10) -> None:
        """Stop every process in the namespaces (SIGTERM, then SIGKILL after ``grace_s``) and delete them."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.processes:
                if proc.poll() is None:
                    signal_group(proc.pid, sig)
            for pid in self.pids():
                signal_process(pid, sig)
            deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5)
            while time.monotonic() < deadline:
                for proc in self.processes:
                    proc.poll()  # reap our own children
                if all(proc.returncode is not None for proc in self.processes) and not self.pids():
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.processes.clear()
        errors = []
        for name in reversed(self._created):
            proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, encoding="utf-8")
            if proc.returncode != 0:
                errors.append(f"{name}: {proc.stderr.strip()}")
        self._created.clear()
        if errors:
            raise NetnsError("could not delete namespace(s): " + "; ".join(errors))
