"""Helpers for the federation tests (and ``bench/federation.py``).

* :class:`LoopbackGrid` — a Flower ``Grid`` in this process: every message and reply is taken apart into
  Flower's wire objects and put back together (deflate/inflate, as the SuperLink transports them), then
  handed to an in-process device function. The strategy runs unchanged on it, in milliseconds.
* device fakes for the validation tests (``reply``), test device profiles whose ranks differ by network
  speed, and process management for the deployment tests (every process started is killed at teardown,
  with its whole process group). TLS files come from :func:`lorafleet.federation.certs.write_tls`, as a user's do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
Device = Callable[[Any], Any]  # Message -> Message
LAPSED = "lapsed"  # a device function's answer when the SuperLink answers for it (its heartbeat lapsed)


# --- an in-process Grid -----------------------------------------------------------------------------------

class LoopbackGrid:
    """A Flower Grid whose nodes are functions ``device(message) -> reply`` in this process.

    Messages cross the same encoding as in deployment (every record deflated to bytes and inflated back), so
    validation sees exactly what a SuperLink would deliver. ``wire_bytes`` counts the bytes each node
    received and sent (message contents as Flower serializes them).
    """

    def __init__(self, devices: dict[int, Device]):
        from flwr.serverapp.grid import Grid
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.devices = devices
        self.sent: list[Any] = []  # every message pushed, as the device received it
        self.wire_bytes: dict[int, dict[str, int]] = {}
        Grid.register(type(self))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.devices)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        from uuid import uuid4

        from flwr.app import Message
        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content, n_in = wire(msg.content)
            delivered = Message(content, dst_node_id=node, message_type=msg.metadata.message_type)
            for m in (msg, delivered):  # Flower's grids give the pushed message its id in place
                m.metadata.__dict__["_message_id"] = msg.metadata.message_id or str(uuid4())
            self.sent.append(delivered)
            answer = self.devices[node](delivered)
            if answer is None:  # the device never answers
                continue
            if isinstance(answer, (str, tuple)):  # LAPSED or (LAPSED, reply): the SuperLink answers for the node,
                replies.append(create_message_error_unavailable_res_message(delivered.metadata, "node_unavail"))
                if isinstance(answer, str):
                    continue
                answer = answer[1]  # ... and with a tuple the device's own reply arrives too
            if answer.has_error():
                replies.append(answer)
                continue
            back, n_out = wire(answer.content)
            reply = Message(back, reply_to=delivered)
            replies.append(reply)
            counts = self.wire_bytes.setdefault(node, {"received": 0, "sent": 0})
            counts["received"] += n_in
            counts["sent"] += n_out
        return replies


class PushPullGrid(LoopbackGrid):
    """:class:`LoopbackGrid` with the calls a deployment grid makes: ``push_messages`` (the device answers at
    once; its reply waits for ``pull_messages``) and ``get_node_ids``. A device answering :data:`LAPSED` is
    answered for by the SuperLink ("Node Unavailable") and is not connected for the next ``offline_polls``
    calls of ``get_node_ids``, as a node whose heartbeats failed until it reached the SuperLink again."""

    def __init__(self, devices: dict[int, Device], offline_polls: int = 2):
        super().__init__(devices)
        self.offline_polls = offline_polls
        self.offline: dict[int, int] = {}  # node -> polls of get_node_ids it stays away
        self.pushed: list[tuple[int, str]] = []  # (node, message id) per push, in order
        self.pushed_while_offline: list[int] = []
        self._replies: dict[str, Any] = {}

    def get_node_ids(self) -> Iterable[int]:
        connected = [n for n in self.devices if self.offline.get(n, 0) <= 0]
        self.offline = {n: k - 1 for n, k in self.offline.items() if k > 1}
        return connected

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        from flwr.common.constant import SUPERLINK_NODE_ID

        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.offline.get(node, 0) > 0:
                self.pushed_while_offline.append(node)
            out = list(self.send_and_receive([msg]))  # gives msg its id
            if any(r.metadata.src_node_id == SUPERLINK_NODE_ID for r in out):
                self.offline[node] = self.offline_polls
            self.pushed.append((node, msg.metadata.message_id))
            self._replies[msg.metadata.message_id] = out
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        return [r for i in list(message_ids) for r in self._replies.pop(i, [])]


def wire(content: Any) -> tuple[Any, int]:
    """``content`` after a trip through Flower's object encoding, and the number of bytes that travelled."""
    root, objects = encode(content)
    return decode(root, objects), sum(len(b) for b in objects.values())


def encode(content: Any) -> tuple[str, dict[str, bytes]]:
    """What the sender does: every nested record, array and array chunk deflated to bytes (object id -> bytes)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return content.object_id, {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}


def decode(root: str, objects: dict[str, bytes]) -> Any:
    """What the receiver does: inflate the objects back into a RecordDict."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    return inflate_object_from_contents(root, dict(objects))


# --- devices for validation tests -------------------------------------------------------------------------

def reply(message: Any, arrays: dict[str, np.ndarray] | None, metrics: dict[str, Any],
          extra: dict[str, Any] | None = None) -> Any:
    """A reply to ``message`` carrying ``arrays`` (any numpy arrays) and ``metrics`` as given."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    records: dict[str, Any] = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        records["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    records.update(extra or {})
    return Message(RecordDict(records), reply_to=message)


def received_arrays(message: Any) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in message.content["arrays"].items()}


# --- device profiles whose ranks differ ------------------------------------------------------------------

PROFILE_TEMPLATE = """name = "{name}"
kind = "host"
memory_total_gib = 8
app_memory_gib = 4
cpu_cores = 2
sustained_gflops = 1000
memory_bandwidth_gbs = 10
network_up_mbps = {mbps}
network_down_mbps = {mbps}
availability = 1.0
runtimes = ["onnxruntime"]

[sources]
{sources}
"""


def profile_for_rank(path: Path, package: Path, rank: int, round_timeout: float) -> Path:
    """A test device whose largest fitting rank is ``rank``: fast compute, and a link so slow that sending
    and receiving the rank-``rank`` adapter takes 60 % of the round budget (the next rank would take 120 %).
    The rank then follows from the budget arithmetic, not from timing noise."""
    from lorafleet.export.formats.package import open_package

    params = open_package(package, verify=False).manifest.rank(rank).trainable_parameters
    bits_both_ways = 2 * 4 * params * 8
    mbps = bits_both_ways / (0.6 * round_timeout) / 1e6
    fields = ("memory_total_gib", "app_memory_gib", "cpu_cores", "sustained_gflops", "memory_bandwidth_gbs",
              "network_up_mbps", "network_down_mbps", "availability")
    sources = "\n".join(f'{f} = "[U] a test device (tests/fed_helpers.py)"' for f in fields)
    path.write_text(PROFILE_TEMPLATE.format(name=f"test device rank {rank}", mbps=f"{mbps:.9f}", sources=sources))
    return path


def write_data(path: Path, n: int, offset: int) -> Path:
    """``n`` small instruction examples (different for each ``offset``)."""
    lines = [json.dumps({"instruction": f"Add {i} and {i + offset}.", "output": str(2 * i + offset)})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- processes --------------------------------------------------------------------------------------------

class Processes:
    """Starts commands in their own process groups; :meth:`stop_all` kills every group (test teardown)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.procs: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**self.env, **(env or {})}, start_new_session=True, cwd=self.logs)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def lorafleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorafleet", *args]


def flower(name: str, *args: str) -> list[str]:
    return [str(Path(sys.executable).parent / name), *args]


def process_env(cache: Path) -> dict[str, str]:
    """Environment of every process the deployment tests start: this checkout first on PYTHONPATH, the
    interpreter's bin on PATH, a private lorafleet cache (rank decisions), no Flower telemetry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(LORAFLEET_CACHE=str(cache), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see lorafleet.federation.flower_env
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def messages_received(node_log: str, kind: str = "train") -> int:
    """How many ``kind`` messages a SuperNode's log says it pulled completely ("Receiving: train message"
    followed by "Received successfully", not "Failed to receive")."""
    count, pending = 0, False
    for line in node_log.splitlines():
        if "Receiving: " in line:
            pending = f"Receiving: {kind} message" in line
        elif "Received successfully" in line and pending:
            count, pending = count + 1, False
    return count


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
