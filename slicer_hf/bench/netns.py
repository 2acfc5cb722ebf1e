"""A shaped network link for benchmarks: a network namespace joined to this one by a veth pair, both ends rate
limited with `tc ... tbf`, and a TCP goodput probe. Needs root and iproute2 (`ip`, `tc`).

Only the private /30 the link creates is ever addressed; the namespace and the veth pair are removed on close.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

NETNS_PREFIX = "slicer-bench-"
TBF_BURST = "32kbit"
TBF_LATENCY = "400ms"


class LinkSetupError(RuntimeError):
    """A command that builds or shapes the benchmark's link failed."""


# ------------------------------------------------------------------------------------------- the shaped link
def netns_unavailable_reason() -> str | None:
    """Why this machine cannot build the link (None when it can): needs root and `ip`/`tc` from iproute2."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "creating a network namespace and shaping a veth pair needs root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)"
    return None


def rate_label(rate_mbit: float | None) -> str:
    """'1 Mbit/s', '0.5 Mbit/s' or 'unshaped'."""
    return "unshaped" if rate_mbit is None else f"{rate_mbit:g} Mbit/s"


def parse_rate(text: str) -> float | None:
    """A CLI rate in Mbit/s: a positive number, or 'unshaped' / 'none' / '0' for no shaping."""
    import argparse

    if text.lower() in ("unshaped", "none"):
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if rate == 0:
        return None
    if not 0 < rate < math.inf:  # (argparse shows this message; a ValueError it would not)
        raise argparse.ArgumentTypeError(f"a rate must be a positive number of Mbit/s or 'unshaped', got {text!r}")
    return rate


def tbf_command(dev: str, rate_mbit: float | None, netns: str | None = None, burst: str = TBF_BURST) -> list[str]:
    """The `tc` command that limits egress of `dev` to `rate_mbit` (None: removes the limit).

    `replace` rather than `add`, so one link can move from rate to rate; the first call adds the qdisc. tbf lets
    `burst` through at line rate after an idle gap: a message smaller than that (a decode step's packet) is not
    slowed down when compute separates the steps, unlike on a physical line of that rate.

    Args:
        dev: the network device whose egress to shape.
        rate_mbit: Mbit/s, or None for no shaping.
        netns: run `tc` inside this network namespace (None: this one).
        burst: the token bucket's size, tc syntax ("32kbit" = 4 KB).
    """
    prefix = ["ip", "netns", "exec", netns] if netns else []
    if rate_mbit is None:
        return [*prefix, "tc", "qdisc", "del", "dev", dev, "root"]
    tbf = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", burst, "latency", TBF_LATENCY]
    return [*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *tbf]


def _run(cmd: Sequence[str], check: bool = True, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        raise LinkSetupError(f"`{shlex.join(cmd)}` failed with {done.returncode}: {done.stderr.strip()}")
    return done


@dataclasses.dataclass
class ShapedLink:
    """A veth pair between this namespace and a namespace of its own, both directions rate-limited with tbf.

    Use as a context manager: entering builds it, leaving removes the namespace and the veth pair.

    Args:
        name: network namespace name.
        host_dev, ns_dev: veth ends in this namespace and in `name`.
        host_addr, ns_addr: their addresses in one private /30.
        burst: tbf bucket size (tc syntax).
    """

    name: str
    host_dev: str
    ns_dev: str
    host_addr: str
    ns_addr: str
    burst: str = TBF_BURST
    rate_mbit: float | None = None

    @classmethod
    def for_pid(cls, pid: int | None = None, burst: str = TBF_BURST) -> ShapedLink:
        """Names and a /30 in 10.231.0.0/16 derived from a process id, so concurrent runs do not collide."""
        pid = os.getpid() if pid is None else pid
        third, base = (pid >> 6) & 0xFF, (pid & 63) * 4
        return cls(
            name=f"{NETNS_PREFIX}{pid}",
            host_dev=f"slb{pid}h",  # interface names have at most 15 characters
            ns_dev=f"slb{pid}n",
            host_addr=f"10.231.{third}.{base + 1}",
            ns_addr=f"10.231.{third}.{base + 2}",
            burst=burst,
        )

    def exec_prefix(self) -> list[str]:
        """Prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def setup_commands(self) -> list[list[str]]:
        ns = self.exec_prefix()
        return [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev],
            ["ip", "link", "set", self.ns_dev, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_dev],
            ["ip", "link", "set", self.host_dev, "up"],
            [*ns, "ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_dev],
            [*ns, "ip", "link", "set", self.ns_dev, "up"],
            [*ns, "ip", "link", "set", "lo", "up"],
        ]

    def shape_commands(self, uplink_mbit: float | None, downlink_mbit: float | None) -> list[list[str]]:
        """Uplink (this side's egress) at `uplink_mbit`, downlink (the namespace side's egress) at `downlink_mbit`."""
        return [
            tbf_command(self.host_dev, uplink_mbit, burst=self.burst),
            tbf_command(self.ns_dev, downlink_mbit, self.name, burst=self.burst),
        ]

    def teardown_commands(self) -> list[list[str]]:
        # Deleting one veth end deletes both; deleting the namespace alone would not if a process still held it.
        return [["ip", "link", "del", self.host_dev], ["ip", "netns", "del", self.name]]

    def exists(self) -> bool:
        """Whether the namespace or this side's veth end is still there."""
        return Path(f"/run/netns/{self.name}").exists() or Path(f"/sys/class/net/{self.host_dev}").exists()

    def __enter__(self) -> ShapedLink:
        if Path(f"/sys/class/net/{self.host_dev}").exists() or Path(f"/run/netns/{self.name}").exists():
            raise LinkSetupError(f"{self.host_dev} or netns {self.name} already exists; remove it or use another pid")
        taken = _run(["ip", "-o", "-4", "addr", "show"]).stdout
        if f" {self.host_addr}/" in taken or f" {self.ns_addr}/" in taken:
            raise LinkSetupError(f"{self.host_addr}/30 is already in use on this machine")
        try:
            for cmd in self.setup_commands():
                _run(cmd)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the veth pair and the namespace (errors for parts already gone are ignored)."""
        for cmd in self.teardown_commands():
            _run(cmd, check=False)
        if self.exists():
            print(f"warning: could not remove netns {self.name} / {self.host_dev}", file=sys.stderr, flush=True)

    def set_rate(self, rate_mbit: float | None) -> None:
        """Shape both directions to `rate_mbit` Mbit/s (None: no shaping)."""
        self.set_rates(rate_mbit, rate_mbit)

    def set_rates(self, uplink_mbit: float | None, downlink_mbit: float | None) -> None:
        """Shape each direction on its own (None: no shaping that way)."""
        for cmd, rate in zip(self.shape_commands(uplink_mbit, downlink_mbit), (uplink_mbit, downlink_mbit)):
            _run(cmd, check=rate is not None)  # deleting an absent qdisc fails harmlessly
        self.rate_mbit = uplink_mbit if uplink_mbit == downlink_mbit else None

    def byte_counters(self) -> tuple[int, int]:
        """Bytes sent and received by this side's veth end (uplink, downlink), all headers included."""
        stats = Path(f"/sys/class/net/{self.host_dev}/statistics")
        return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


# A bulk-transfer peer run inside the namespace: receives N bytes, acknowledges, sends N bytes back.
_GOODPUT_PEER = r"""
import socket, sys
n = int(sys.argv[2])
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(float(sys.argv[3]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[3]))
got = 0
while got < n:
    chunk = conn.recv(1 << 16)
    if not chunk:
        sys.exit(1)
    got += len(chunk)
conn.sendall(b"k")
conn.sendall(bytes(n))
conn.close()
"""


def goodput_bytes(rate_mbit: float | None) -> int:
    """Bulk-transfer size for measuring a rate: about one second's worth, 64 KiB .. 16 MiB."""
    if rate_mbit is None:
        return 16 << 20
    return int(min(max(rate_mbit * 1e6 / 8, 64 << 10), 16 << 20))


def measure_goodput(link: ShapedLink, nbytes: int, timeout_s: float = 120.0) -> dict[str, float]:
    """TCP goodput each way over `link`, in Mbit/s, from one bulk transfer of `nbytes` per direction."""
    cmd = [*link.exec_prefix(), sys.executable, "-c", _GOODPUT_PEER, link.ns_addr, str(nbytes), str(timeout_s)]
    peer = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = peer.stdout.readline().strip()
        if not line.isdigit():
            raise LinkSetupError(f"goodput peer in {link.name} did not start (exit code {peer.wait()})")
        port = int(line)
        with socket.create_connection((link.ns_addr, port), timeout=timeout_s) as sock:
            t0 = time.perf_counter()
            sock.sendall(bytes(nbytes))
            if sock.recv(1) != b"k":
                raise LinkSetupError("goodput peer did not acknowledge")
            t1 = time.perf_counter()
            got = 0
            while got < nbytes:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise LinkSetupError(f"goodput peer closed after {got} of {nbytes} bytes")
                got += len(chunk)
            t2 = time.perf_counter()
        peer.wait(timeout=timeout_s)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    return {"bytes": nbytes, "uplink_mbit_s": 8e-6 * nbytes / (t1 - t0), "downlink_mbit_s": 8e-6 * nbytes / (t2 - t1)}


# ------------------------------------------------------------------------------------------- the server
