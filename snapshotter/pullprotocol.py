"""The pull socket's protocol: what `cafs pull` sends the snapshotter and what comes back.

Kept apart from the server (snapshotter/pullservice.py) so the command imports only this,
cafs.ipc and the standard library: a cold interpreter importing grpc and the store client
cost `cafs pull` more than the pull itself. The framing is cafs/ipc.py's; the messages:
request {"op": "pull", "ref": str, "name": str or null, "address": containerd's socket,
"namespace": str, "snapshotter": containerd's name for the cafs plugin}; reply
{"ok": {"name": str, "top_chain": str, "prepared": [chain ids], "present": [chain ids]}}
or {"error": why}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cafs import ipc

PULL_TIMEOUT = 600.0  # seconds a client waits for the reply: containerd may be slow


def pull_socket(snapshotter_socket: Path | str) -> Path:
    """Where the snapshotter serving containerd on `snapshotter_socket` takes pulls: beside
    it, in the directory its operator chose for it."""
    return Path(f"{snapshotter_socket}.pull")


@dataclass
class PullResult:
    name: str
    top_chain: str
    prepared: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)

    @classmethod
    def from_message(cls, message: Any) -> PullResult:
        """ProtocolError where `message` is not a pull result."""
        try:
            return cls(name=str(message["name"]), top_chain=str(message["top_chain"]),
                       prepared=[str(c) for c in message["prepared"]],
                       present=[str(c) for c in message["present"]])
        except (KeyError, TypeError) as exc:
            raise ipc.ProtocolError(f"not a pull result: {exc!r}") from None


@dataclass(frozen=True)
class PullRequest:
    ref: str
    name: str | None
    address: str
    namespace: str
    snapshotter: str

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PullRequest:
        """ProtocolError naming what is missing or of the wrong type."""
        if ipc.op_of(message) != "pull":
            raise ipc.ProtocolError(f"unknown op {message['op']!r}")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise ipc.ProtocolError('"name" must be a string or null')
        ref, address, namespace, snapshotter = (
            ipc.text_arg(message, f) for f in ("ref", "address", "namespace", "snapshotter"))
        if not ref:
            raise ipc.ProtocolError("an empty ref")
        return cls(ref, name, address, namespace, snapshotter)

    def message(self) -> dict[str, Any]:
        return {"op": "pull", **asdict(self)}


def ask(sock: Path, request: PullRequest) -> PullResult | None:
    """The snapshotter's pull; None where nothing listens on `sock` (no snapshotter, or an
    older one without a pull socket). OSError for a socket that is not ours or fails;
    ipc.ErrorReply for the snapshotter's refusal; ipc.ProtocolError for a garbled reply."""
    try:
        client = ipc.Client(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    with client:
        client.send(request.message())
        return PullResult.from_message(ipc.result_of(client.receive(timeout=PULL_TIMEOUT)))
