"""The native backend: the package's ExecuTorch training program run by ``lorafleet-native`` — the C++ trainer
in ``edge_client/native/`` on the ExecuTorch runtime, the code an Android or iOS app links (docs/devices.md).

The tool runs as a child process speaking its ``serve`` protocol (one request line on stdin, one reply line on
stdout): ``step`` followed by the batch's int64 input ids and labels, answered ``loss <float>``; ``load <reset>
<adapter dir>`` and ``save <new dir>``, answered ``ok``; any failure ``error <reason>``. The AdamW update runs in
the C++ process, operation for operation as :class:`lorafleet.edge_client.backends.base.AdamW`. Adapters cross
as PEFT directories (safetensors) in a private temporary directory, read back with the same validation as any
received adapter.

:func:`write_batches` writes the token-batch file ``lorafleet-native train --batches`` reads (layout in
``edge_client/native/include/lorafleet_native/batches.h``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lorafleet.edge_client.backends.base import OptimizerConfig, check_rank
from lorafleet.export.formats.errors import ConfigError, PackageError

if TYPE_CHECKING:
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.export.formats.package import Package

BINARY = "lorafleet-native"
BATCH_MAGIC, BATCH_VERSION = b"LFTB", 1
START_TIMEOUT = 120.0  # seconds to load the program (a 1B program maps GBs)


def native_binary() -> Path:
    """The built tool: ``$LORAFLEET_NATIVE``, else ``build/native/lorafleet-native`` of this checkout (``make
    native``), else one on ``PATH``. :class:`ConfigError` saying how to build it when there is none."""
    env = os.environ.get("LORAFLEET_NATIVE")
    if env:
        if not Path(env).is_file():
            raise ConfigError(f"LORAFLEET_NATIVE={env} is not a file")
        return Path(env)
    built = Path(__file__).resolve().parents[2] / "build" / "native" / BINARY
    if built.is_file():
        return built
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise ConfigError("the native trainer is not built: run `make native` (needs cmake >= 3.19 and a C++17 "
                      "compiler; it links the executorch wheel's C++ runtime)")


def write_batches(path: str | Path, batches: Iterable[Batch]) -> int:
    """Write ``batches`` (all of one ``(B, T)`` shape) as a token-batch file; returns how many were written."""
    import numpy as np

    rows = [(np.ascontiguousarray(b.input_ids, dtype="<i8"), np.ascontiguousarray(b.labels, dtype="<i8"))
            for b in batches]
    if not rows:
        raise ConfigError("no batches to write")
    shape = rows[0][0].shape
    if len(shape) != 2 or any(a.shape != shape or b.shape != shape for a, b in rows):
        raise ConfigError(f"batches must all have one (B, T) shape, got {sorted({a.shape for a, _ in rows})}")
    with open(path, "wb") as f:
        f.write(BATCH_MAGIC + struct.pack("<IIIQ", BATCH_VERSION, shape[0], shape[1], len(rows)))
        for ids, labels in rows:
            f.write(ids.tobytes())
            f.write(labels.tobytes())
    return len(rows)


class NativeBackend:
    name = "native"

    def __init__(self, package: Package, rank: int, optimizer: OptimizerConfig, binary: Path | None = None):
        self.rank = rank
        self._tmp = tempfile.TemporaryDirectory(prefix="lorafleet-native-")
        self._saves = 0
        cmd = [str(binary or native_binary()), "serve", "--package", str(package.path), "--rank", str(rank),
               "--lr", repr(optimizer.lr), "--beta1", repr(optimizer.betas[0]), "--beta2", repr(optimizer.betas[1]),
               "--eps", repr(optimizer.eps), "--weight-decay", repr(optimizer.weight_decay)]
        # the tool's stderr (the runtime's error lines) goes to a file: a pipe nobody reads could fill and stall it
        self._err_path = Path(self._tmp.name) / "stderr.log"
        with open(self._err_path, "wb") as err:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        ready = self._line()
        if not ready.startswith("ready "):
            raise PackageError(f"{BINARY} could not load rank {rank} of {package.path}: {self._stderr(ready)}")
        import json

        self.info: dict[str, Any] = json.loads(ready.removeprefix("ready "))
        self.input_shape = (int(self.info["batch_size"]), int(self.info["seq_len"]))

    @classmethod
    def from_package(cls, package: Package, rank: int, optimizer: OptimizerConfig) -> NativeBackend:
        from lorafleet.export.formats.program import LoraSpec, check_compiled

        if "executorch" not in package.manifest.runtimes:
            raise PackageError(f"{package.path} has no ExecuTorch programs (runtimes: "
                               f"{', '.join(package.manifest.runtimes)}): the native trainer runs those")
        backend = cls(package, rank, optimizer)
        try:
            info = backend.info
            spec = LoraSpec(int(info["rank"]), tuple(info["target_modules"]), float(info["lora_alpha"]),
                            bool(info["use_rslora"]))
            check_compiled(package.manifest, rank, "executorch_training", spec, backend.input_shape)
            backend.load_adapter(package.initial_adapter(rank))
        except Exception:
            backend.close()
            raise
        return backend

    def step(self, batch: Batch) -> float:
        import numpy as np

        ids = np.ascontiguousarray(batch.input_ids, dtype="<i8")
        labels = np.ascontiguousarray(batch.labels, dtype="<i8")
        if ids.shape != self.input_shape or labels.shape != self.input_shape:
            raise ConfigError(f"input_ids must have the program's shape {self.input_shape}, got {ids.shape}")
        return float(self._ask(b"step\n" + ids.tobytes() + labels.tobytes()).removeprefix("loss "))

    def adapter_state(self) -> Adapter:
        from lorafleet.export.formats.adapter import read_adapter

        self._saves += 1
        out = Path(self._tmp.name) / f"state-{self._saves}"
        self._ask(f"save {out}\n".encode())
        try:
            return read_adapter(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def load_adapter(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None:
        from lorafleet.export.formats.adapter import rescale, write_adapter

        check_rank(adapter, self.rank)
        path = Path(self._tmp.name) / "load"
        # at the program's scaling already: one lora_alpha, no per-module patterns for the tool to refuse
        write_adapter(rescale(adapter, float(self.info["lora_alpha"]), use_rslora=bool(self.info["use_rslora"])),
                      path, overwrite=True)
        self._ask(f"load {int(reset_optimizer)} {path}\n".encode())

    def peak_rss_bytes(self) -> int:
        """The tool process's peak resident memory (``VmHWM``): the device side's whole footprint — runtime,
        program, planned memory and the foundation pages it touched — with no interpreter in it."""
        from lorafleet.export.runtime.memory import peak_rss_bytes

        return peak_rss_bytes(self._proc.pid)

    def cpu_seconds(self) -> float:
        """CPU time the tool process has used (user + system)."""
        import psutil

        t = psutil.Process(self._proc.pid).cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._write(b"quit\n")
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._tmp.cleanup()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.close()

    # --- the protocol ------------------------------------------------------------------------------------

    def _ask(self, request: bytes) -> str:
        self._write(request)
        reply = self._line()
        if reply.startswith("error "):
            from lorafleet.export.formats.errors import AdapterError

            reason = reply.removeprefix("error ")
            raise (AdapterError if "adapter" in reason else ConfigError)(f"{BINARY}: {reason}")
        if not reply:
            raise PackageError(f"{BINARY} stopped: {self._stderr('')}")
        return reply

    def _write(self, data: bytes) -> None:
        stdin: IO[bytes] | None = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            stdin.flush()
        except BrokenPipeError as exc:
            raise PackageError(f"{BINARY} stopped: {self._stderr('')}") from exc

    def _line(self) -> str:
        stdout: IO[bytes] | None = self._proc.stdout
        assert stdout is not None
        return stdout.readline().decode(errors="replace").rstrip("\n")

    def _stderr(self, reply: str) -> str:
        """The reason the tool gave: its one-line error once it has exited (stdout closed), else ``reply``."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10 if not reply else 0.5)
        if self._proc.poll() is None:
            return reply or "no reply"
        err = self._err_path.read_text(errors="replace") if self._err_path.is_file() else ""
        lines = [ln for ln in err.splitlines() if "lorafleet-native" in ln] or err.splitlines()[-1:]
        return lines[-1] if lines else f"exit status {self._proc.returncode}"

