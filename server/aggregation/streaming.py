"""Aggregating PEFT adapter directories without holding every client's adapter in memory.

:class:`LazyAdapter` opens a client's directory and reads only its ``adapter_config.json`` and the
safetensors *header* (names, shapes, dtypes: enough to validate the client against the others). Tensor
values are read later, one module at a time, through one ``safetensors.safe_open`` handle per client kept
open for the whole run (the header is parsed once, not once per module): the engine asks for module m,
every client's lora_A / lora_B of m are read, checked (finite, shapes, rank as declared) and aggregated,
then dropped. Peak memory is therefore one module's factors for all clients plus the global adapter being
built, not K full adapters. Client files are never unpickled: a directory holding only ``adapter_model.bin``
is refused. Close the handles with :meth:`LazyAdapter.close` (or use it as a context manager).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lorafleet.export.formats.adapter import (  # the private helpers keep one definition of the format's rules
    LORA_KEY,
    LoraPair,
    _read_config,
    adapter_from_state_dict,
    weights_file,
)
from lorafleet.export.formats.errors import AdapterError
from lorafleet.server.aggregation.common import ModuleSpec

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class LazyAdapter:
    """A client's PEFT adapter directory: config and header read now, tensors read per module on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.weights = weights_file(self.path)
        self.config: dict[str, Any] = _read_config(self.path / "adapter_config.json")
        self._keys: dict[str, tuple[str, str]] = {}  # module -> (lora_A key, lora_B key)
        self.specs: dict[str, ModuleSpec] = {}
        self._file: Any = None
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LazyAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def pair(self, module: str) -> LoraPair:
        """Read and check one module's factors (finite values, shapes, rank as the config says)."""
        key_a, key_b = self._keys[module]
        try:
            f = self._file
            tensors = {key_a: f.get_tensor(key_a), key_b: f.get_tensor(key_b)}
        except Exception as exc:  # the file changed or broke after the header was read
            raise AdapterError(f"corrupt or truncated safetensors file {self.weights}: "
                               f"{str(exc).splitlines()[0]}") from exc
        return adapter_from_state_dict(tensors, self.config, origin=str(self.path)).modules[module]

    def _read_header(self) -> None:
        import torch
        from safetensors import safe_open

        try:
            f = safe_open(str(self.weights), framework="pt")
            f.__enter__()
            self._file = f
            header = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # SafetensorError on a corrupt or truncated header
            raise AdapterError(f"corrupt or truncated safetensors file {self.weights}: "
                               f"{str(exc).splitlines()[0]}") from exc
        # Meta tensors carry shapes and dtypes only: the foundation's checks run without reading any value.
        meta = {k: torch.empty(shape, dtype=getattr(torch, _DTYPES.get(dt, "int32")), device="meta")
                for k, (shape, dt) in header.items()}
        adapter = adapter_from_state_dict(meta, self.config, check_finite=False, origin=str(self.path))
        for key in header:
            m = LORA_KEY.match(key)
            assert m is not None  # adapter_from_state_dict accepted every key
            a, b = self._keys.get(m["module"], ("", ""))
            self._keys[m["module"]] = (key, b) if m["which"] == "A" else (a, key)
        self.specs = {n: ModuleSpec(p.r, p.shape, p.scaling) for n, p in adapter.modules.items()}


def open_clients(paths: Sequence[str | Path], stack: ExitStack) -> list[LazyAdapter]:
    """Open every client directory (configs and headers only), failing on the first bad one; ``stack``
    closes them."""
    return [stack.enter_context(LazyAdapter(p)) for p in paths]
