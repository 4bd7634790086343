"""A shaped network link for the services the benchmarks fetch from.

The kernel here has `tbf` but not `netem`, so a link is built from two parts:

- bandwidth: a network namespace joined to the host by a veth pair, with a `tbf` qdisc on
  both ends (requests one way, data the other); a server started inside the namespace is
  reached at its veth address, through the limit;
- latency: a small asyncio TCP proxy on the host's loopback in front of that server, holding
  each chunk of data for half the round-trip time in each direction (and a full round trip
  for connection set-up), so order and bandwidth are kept and every request pays the delay.

`--link RATE:DELAY` (tc rate, round-trip time: "1gbit:10ms", "100mbit:40ms") selects it;
"loopback" (the default) leaves everything on loopback. Every namespace, link and proxy is
removed on exit. Run as `python -m bench.netshape proxy PORT HOST PORT DELAY_MS` for the
proxy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.services import stop_process

if TYPE_CHECKING:
    from bench.context import Context

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$", re.IGNORECASE)
_RATE_BYTES = {
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "bps": 1,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Link:
    rate: str  # as tc spells it, e.g. "1gbit"
    delay_ms: float  # round-trip time added by the proxy

    @property
    def bytes_per_second(self) -> float:
        m = _RATE.match(self.rate)
        assert m is not None
        return float(m.group(1)) * _RATE_BYTES[m.group(2).lower()]


def parse_link(text: str) -> Link | None:
    """ "loopback" -> None; "RATE:DELAY" (e.g. "1gbit:10ms") -> Link; else ValueError."""
    if text == "loopback":
        return None
    rate, _, delay = text.partition(":")
    m = re.match(r"^(\d+(?:\.\d+)?)ms$", delay or "0ms")
    if not _RATE.match(rate) or m is None:
        raise ValueError(f"bad --link {text!r}: use loopback or RATE:DELAY, e.g. 1gbit:10ms")
    return Link(rate.lower(), float(m.group(1)))


@dataclass(frozen=True)
class Netns:
    name: str
    host_ip: str
    ns_ip: str
    link: Link

    @property
    def wrap(self) -> list[str]:
        """Prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _tbf(link: Link, dev: str, netns: str | None) -> None:
    burst = max(64 << 10, int(link.bytes_per_second / 100))  # 10 ms worth, at least 64 KiB
    wrap = ["ip", "netns", "exec", netns] if netns else []
    cmd = [
        *wrap,
        "tc",
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        link.rate,
        "burst",
        str(burst),
        "latency",
        "50ms",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def namespace(link: Link) -> Iterator[Netns]:
    """A network namespace behind a tbf-limited veth pair; removed on exit."""
    tag = f"{os.getpid() % 100000}{time.monotonic_ns() % 100}"
    name, host_if, ns_if = f"cafsb{tag}", f"cafsb{tag}h", f"cafsb{tag}n"
    subnet = 16 + os.getpid() % 200
    ns = Netns(name, f"10.213.{subnet}.1", f"10.213.{subnet}.2", link)
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _tbf(link, host_if, None)
        _tbf(link, ns_if, name)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def namespaces() -> list[str]:
    """Names of the benchmark's namespaces that exist now (for leak checks)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("cafsb")]


# --- the delaying proxy ----------------------------------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction, each chunk delivered `delay` seconds after it arrived."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(_CHUNK)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()  # and wait for it, or asyncio reports it destroyed while pending
        await asyncio.gather(sender, return_exceptions=True)


async def _serve(port: int, host: str, target_port: int, rtt: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(rtt)  # the handshake's round trip
            up_r, up_w = await asyncio.open_connection(host, target_port)
        except OSError:
            client_w.close()
            return
        pumps = [asyncio.create_task(_pump(client_r, up_w, rtt / 2)),
                 asyncio.create_task(_pump(up_r, client_w, rtt / 2))]
        try:
            # Until both directions end, or one fails (the connection is then torn down).
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for w in (up_w, client_w):
                w.close()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def delay_proxy(port: int, host: str, target_port: int, delay_ms: float) -> Iterator[None]:
    """The proxy in a child process (off the benchmark's GIL), stopped on exit."""
    cmd = [
        sys.executable,
        "-m",
        "bench.netshape",
        "proxy",
        str(port),
        host,
        str(target_port),
        str(delay_ms),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"delay proxy did not start (exit {proc.wait()})")
        yield
    finally:
        stop_process(proc, timeout=5)


@contextlib.contextmanager
def shaped_link(ctx: Context) -> Iterator[None]:
    """Set the run's link up (nothing for loopback); `ctx.netns` then tells services where."""
    link = parse_link(ctx.opts.link)
    if link is None:
        yield
        return
    with namespace(link) as ns:
        ctx.netns = ns
        try:
            yield
        finally:
            ctx.netns = None


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "proxy":
        print("usage: python -m bench.netshape proxy PORT TARGET_HOST TARGET_PORT DELAY_MS")
        return 2
    port, host, target, delay_ms = int(argv[1]), argv[2], int(argv[3]), float(argv[4])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(port, host, target, delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
