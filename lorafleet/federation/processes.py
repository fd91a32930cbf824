"""Running a real federation on Flower's own processes: what ``lorafleet serve`` and ``lorafleet client`` do.

``serve`` starts Flower's SuperLink (``flower-superlink``: Fleet, Control and Runtime APIs over HTTP on one port) as a
child process, submits the lorafleet app to it (``flwr run``, which builds the FAB from
``lorafleet/federation/flower-app``), streams the run's log (``flwr log --stream``), and stops the SuperLink when the
run ends. ``client`` starts a SuperNode (``flower-supernode``) whose ClientApp is lorafleet's, with the device's
settings as its node config. Everything Flower keeps on disk goes to a private ``FLWR_HOME`` (the server's under
``DIR/flower/``, a device's in a temporary directory), never ``~/.flwr``.

Flower children are started in the caller's environment with ``--disable-runtime-dependency-installation``
(nothing is downloaded per run) and, on Linux, die with their parent (``PR_SET_PDEATHSIG``): a killed
``lorafleet serve`` takes its SuperLink — and the SuperLink its ServerApp — with it, so a restarted server
finds its port free. The SuperLink's database (``DIR/flower/superlink.db``) keeps node registrations across
such a restart, so connected SuperNodes carry on with the resumed run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lorafleet.export.formats.errors import ConfigError, LorafleetError
from lorafleet.federation.app_guard import APP_DIR

__all__ = ["APP_DIR", "FederationError", "Tls", "free_port", "parse_address", "run_client", "serve"]

CONNECTION = "lorafleet"
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0


class FederationError(LorafleetError):
    """A Flower process that failed to start, or a run that did not complete."""


@dataclass(frozen=True)
class Tls:
    """TLS files. Server: its certificate, key, and the CA that signed it. Device: the CA to trust."""

    certfile: str = ""
    keyfile: str = ""
    ca_certfile: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certfile or self.keyfile or self.ca_certfile)

    def check_server(self) -> None:
        given = [bool(self.certfile), bool(self.keyfile), bool(self.ca_certfile)]
        if any(given) and not all(given):
            raise ConfigError("TLS needs all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")
        _files_exist(self.certfile, self.keyfile, self.ca_certfile)

    def check_client(self) -> None:
        _files_exist(self.ca_certfile)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address must be HOST:PORT, got {address!r}")
    return host, int(port)


# --- server ---------------------------------------------------------------------------------------------

def serve(config: Any, address: str, tls: Tls, *, authorized_keys: Path | None = None,
          echo: Callable[[str], None] = print) -> Any:
    """Run ``config`` (a :class:`lorafleet.server.server_app.ServerConfig` with a ``state_dir``) with devices connecting
    to ``address``; returns the final server state. Raises :class:`FederationError` if the run fails.

    The SuperLink listens on 127.0.0.1 only (its Control and Runtime APIs never face the network) behind
    :mod:`lorafleet.federation.gateway`, which serves devices the Fleet API alone on ``address``. The two speak TLS with
    a certificate made for this run (``DIR/flower/loopback-tls/``). With ``authorized_keys`` (a ``.pub`` file
    or a directory of them) the SuperLink authenticates SuperNodes: only a node holding one of those keys'
    private halves can register.
    """
    from lorafleet.federation.certs import read_public_keys, write_tls
    from lorafleet.server.checkpoint import Checkpoint
    from lorafleet.server.server_app import preflight

    host, port = parse_address(address)
    tls.check_server()
    keys = read_public_keys(authorized_keys) if authorized_keys is not None else []
    if keys and not tls.enabled:
        raise ConfigError("SuperNode authentication (--authorized-keys) needs TLS: give --ssl-certfile, "
                          "--ssl-keyfile and --ssl-ca-certfile")
    preflight(config)
    home = Checkpoint(config.state_dir).flower_dir
    home.mkdir(parents=True, exist_ok=True)
    link = write_tls(home / "loopback-tls", [LOOPBACK], days=30, keep_ca_key=False,
                     common_name="lorafleet loopback CA (this server only)")
    link_port = free_port(LOOPBACK)
    _write_connection(home, LOOPBACK, link_port, str(link.ca))
    if not tls.enabled:
        echo("lorafleet: warning: no TLS certificates given: devices connect in plaintext (use only on a "
             "trusted network)")
    elif not keys:
        echo("lorafleet: warning: no --authorized-keys: any device that trusts the CA can join the federation")
    superlink = [_bin("flower-superlink"), "--host", LOOPBACK, "--port", str(link_port), "--database",
                 str(home / "superlink.db"), "--disable-runtime-dependency-installation",
                 "--ssl-certfile", str(link.cert), "--ssl-keyfile", str(link.key), "--ssl-ca-certfile", str(link.ca),
                 *(["--enable-supernode-auth"] if keys else [])]
    gateway = [sys.executable, "-m", "lorafleet", "gateway", "--listen", address,
               "--superlink", f"{LOOPBACK}:{link_port}", "--superlink-ca", str(link.ca), *_gateway_tls_args(tls)]
    with _terminating_on_sigterm(), open(home / "superlink.log", "ab") as log, \
            _child(superlink, home, log) as link_proc:
        _wait_for_port(LOOPBACK, link_port, link_proc, home / "superlink.log", "flower-superlink")
        _register_nodes(keys, home, echo)
        with open(home / "gateway.log", "ab") as glog, _child(gateway, home, glog) as gate:
            _wait_for_port(_client_host(host), port, gate, home / "gateway.log", "the lorafleet gateway")
            echo(f"lorafleet: devices connect to {host}:{port} (Fleet API only; SuperLink on {LOOPBACK}:{link_port}, "
                 f"log: {home / 'superlink.log'})")
            run_id = _submit(config, home)
            echo(f"lorafleet: run {run_id} started ({config.method}, {config.rounds} rounds, state in "
                 f"{config.state_dir})")
            _stream_log(run_id, home, echo)
            status = _run_status(home, run_id)
    ckpt = Checkpoint(config.state_dir)
    state = ckpt.load()[0] if ckpt.exists() else None
    if status != "finished:completed" or state is None or not state.finished:
        done = f"after round {state.round} of {config.rounds}" if state else "before its first checkpoint"
        raise FederationError(f"run {run_id} ended {status} {done} (SuperLink log: {home / 'superlink.log'}); "
                              f"restart with --resume to continue")
    return state


def _register_nodes(keys: list[Path], home: Path, echo: Callable[[str], None]) -> None:
    """Register every authorized SuperNode key with the SuperLink. A key an earlier start of the same state
    directory registered stays registered (the SuperLink's database keeps it): Flower answers "already in
    use", which is what we want."""
    for key in keys:
        try:
            _flwr(["supernode", "register", str(key), CONNECTION], home)
        except FederationError as exc:
            if "already in use" not in str(exc):
                raise
    if keys:
        echo(f"lorafleet: {len(keys)} authorized device key(s); other devices are refused")


def _submit(config: Any, home: Path) -> int:
    import tomli_w

    run_config = home / "run-config.toml"
    values = {k: v for k, v in config.to_run_config().items()}
    values["package"] = str(Path(config.package).resolve())
    values["state-dir"] = str(Path(config.state_dir).resolve())
    run_config.write_text(tomli_w.dumps(values))
    out = _flwr(["run", str(APP_DIR), CONNECTION, "--run-config", str(run_config), "--format", "json"], home)
    try:
        return int(json.loads(out[out.index("{"):])["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FederationError(f"flwr run did not start the run: {out.strip()[-400:]}") from None


def _run_status(home: Path, run_id: int) -> str:
    out = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], home)
    try:
        runs = json.loads(out[out.index("{"):])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def _write_connection(home: Path, host: str, port: int, ca_certfile: str) -> None:
    """``FLWR_HOME/config.toml`` naming this SuperLink, for the ``flwr`` commands serve runs."""
    import tomli_w

    conn: dict[str, Any] = {"address": f"{_bracket(host)}:{port}"}
    if ca_certfile:
        conn["root-certificates"] = str(Path(ca_certfile).resolve())
    else:
        conn["insecure"] = True
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def _gateway_tls_args(tls: Tls) -> list[str]:
    if not tls.enabled:
        return []
    return ["--ssl-certfile", str(Path(tls.certfile).resolve()), "--ssl-keyfile", str(Path(tls.keyfile).resolve())]


# --- device ---------------------------------------------------------------------------------------------

def run_client(settings: Any, server: str, tls: Tls, *, auth_key: Path | None = None,
               trusted_apps: tuple[str, ...] = (), runtime_port: int = 0, log: IO[bytes] | None = None,
               exit_on_finish: bool = False, verbose: bool = False, echo: Callable[[str], None] = print) -> int:
    """Run a SuperNode with the lorafleet ClientApp (``settings``:
    :class:`lorafleet.edge_client.flower_client.NodeSettings`) until it stops; returns its exit status.

    The SuperNode runs lorafleet's app and nothing else (:mod:`lorafleet.federation.app_guard`: a FAB whose sha256 is
    not that of lorafleet's own app, or one of ``trusted_apps``, is refused before it is installed). ``auth_key``: the
    node's private key for SuperNode authentication (needs TLS).

    What the owner sees goes to ``echo``: a line per round (the ClientApp's events) and Flower's warnings and
    errors (:mod:`lorafleet.federation.node_log`; everything with ``verbose``). ``log``: write the SuperNode's raw
    output there instead. ``exit_on_finish``: return 0 once the server's last round is trained and the
    server has gone (the SuperNode gives up reconnecting after ``EXIT_WAIT`` s, Flower's
    ``--max-wait-time``) or ``FINISH_GRACE`` s have passed; without it a SuperNode retries forever."""
    import dataclasses

    import tomli_w

    from lorafleet.federation.app_guard import fab_sha256, write_guard_bin
    from lorafleet.federation.node_log import EXIT_WAIT, follow_node

    host, port = parse_address(server)
    tls.check_client()
    auth_args: list[str] = []
    if auth_key is not None:
        if not auth_key.is_file():
            raise ConfigError(f"SuperNode key not found: {auth_key}")
        if not tls.ca_certfile:
            raise ConfigError("SuperNode authentication (--auth-key) needs TLS: give --root-certificates")
        auth_args = ["--auth-supernode-private-key", str(auth_key.resolve())]
    with tempfile.TemporaryDirectory(prefix="lorafleet-node-") as tmp, _terminating_on_sigterm():
        home = Path(tmp)
        guard = write_guard_bin(home / "bin", (fab_sha256(), *trusted_apps))
        events = home / "events.jsonl"
        node_config = home / "node-config.toml"
        node_config.write_text(tomli_w.dumps(dataclasses.replace(settings, events=str(events)).to_node_config()))
        tls_args = (["--root-certificates", str(Path(tls.ca_certfile).resolve())] if tls.ca_certfile
                    else ["--insecure"])
        cmd = [_bin("flower-supernode"), "--superlink", f"{_bracket(host)}:{port}", "--node-config", str(node_config),
               "--host", LOOPBACK, "--port", str(runtime_port or free_port()), *tls_args, *auth_args,
               *(["--max-wait-time", str(EXIT_WAIT)] if exit_on_finish else [])]
        with _child(cmd, home, log if log is not None else subprocess.PIPE, path_first=guard) as node:
            return follow_node(node, events, echo, exit_on_finish=exit_on_finish, verbose=verbose)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --- processes ------------------------------------------------------------------------------------------

def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower child: this interpreter's bin first on PATH (flower-superexec is
    launched from PATH; this interpreter has lorafleet installed), Flower's files in ``home``, no telemetry or
    update checks.

    ``OMP_WAIT_POLICY=PASSIVE`` (unless set): Flower runs several processes on one machine, and torch's OpenMP
    threads spin-waiting while another process holds a core made small float64 matmuls hundreds of times
    slower on a 2-core host (docs/BENCHMARKS.md, "OpenMP spin-waiting")."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")  # the run's log reaches the terminal (or file) as it happens
    return env


@contextmanager
def _child(cmd: list[str], home: Path, log: IO[bytes] | int | None,
           path_first: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` (with ``path_first`` ahead of everything on its ``PATH``; output to ``log``, a file or
    ``subprocess.PIPE``, else inherited); on leaving the block it is stopped (SIGTERM, then SIGKILL after 10 s)."""
    env = flower_env(home)
    if path_first is not None:
        env["PATH"] = os.pathsep.join([str(path_first), env["PATH"]])
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT if log is not None else None, preexec_fn=_die_with_parent)
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    if sys.platform.startswith("linux"):
        import contextlib
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # no glibc: the child outlives a killed parent
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


@contextmanager
def _terminating_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that children are stopped on the way out."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stream_log(run_id: int, home: Path, echo: Callable[[str], None]) -> None:
    """The run's log (``flwr log --stream``) line by line to ``echo``, without ANSI colours unless stdout is a
    terminal (a log file or CI output shows ``INFO : ...``, not escape codes)."""
    from lorafleet.federation.node_log import ANSI

    color = sys.stdout.isatty()
    with subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=flower_env(home),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          preexec_fn=_die_with_parent) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            echo(line if color else ANSI.sub("", line))
    if proc.returncode != 0:
        raise FederationError(f"`flwr log {run_id}` failed with status {proc.returncode}")


def _flwr(args: list[str], home: Path, stdout: int | None = subprocess.PIPE) -> str:
    proc = subprocess.run([_bin("flwr"), *args], env=flower_env(home), stdin=subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.STDOUT if stdout is not None else None, text=True,
                          preexec_fn=_die_with_parent)
    if proc.returncode != 0:
        raise FederationError(f"`flwr {' '.join(args[:2])}` failed: {(proc.stdout or '').strip()[-600:]}")
    return proc.stdout or ""


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
            raise FederationError(f"{what} exited with status {proc.returncode}: {' | '.join(tail)}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FederationError(f"{what} did not listen on {host}:{port} within {START_TIMEOUT:.0f} s")


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name} not found next to {sys.executable} or on PATH (is flwr installed?)")
    return found


def _client_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _files_exist(*paths: str) -> None:
    for p in paths:
        if p and not Path(p).is_file():
            raise ConfigError(f"TLS file not found: {p}")
