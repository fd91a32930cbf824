"""A quantized base loaded from its checkpoint without ever holding the full-precision model.

Loading a Hugging Face model in fp32 and then quantizing it (:func:`lorafleet.export.compiler.quantize.quantize_model`)
needs the whole fp32 model in memory: 4.9 GB for a 1B model, 12.9 GB for 3B, 32 GB for 8B. Here the model is
built from its config with its parameters on the meta device (buffers such as rotary tables are computed as
usual), :func:`quantize_model` turns it into quantized modules whose stored tensors are still meta, and
:func:`fill_quantized` then reads the checkpoint one tensor at a time (safetensors: a single file or the shards
``save_pretrained`` writes), quantizes each matrix as it is read and drops it::

    peak ≈ the quantized model + QUANTIZE_ROWS rows of one matrix in fp32 and their quantization's temporaries

The stored bytes are those of ``quantize_model`` on the fp32 model (the same function of the same values),
so a package exported this way computes with exactly the weights of one exported the other way.

What quantization costs is measured against the fp32 model on a fixed text; :func:`streamed_fp32` gives that
model as one whose forward reads each module's weights from the checkpoint just before the module runs and
drops them right after (forward hooks), so the reference is computed layer by layer, never whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.export.formats.errors import ModelSpecError

Rename = Callable[[str], "str | None"]  # checkpoint key -> the model's parameter name (None: not the model's)


class Checkpoint:
    """A directory's safetensors tensors, by the model's parameter names, read one at a time as fp32.

    Each read opens its file, copies the one tensor out and closes the file again: a handle kept open would
    keep every page it ever read mapped into the process (the whole checkpoint, by the end of a load)."""

    def __init__(self, path: Path, rename: Rename | None = None):
        from safetensors import SafetensorError, safe_open

        self.path = path
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelSpecError(f"{path} holds no safetensors files")
        self._where: dict[str, tuple[Path, str]] = {}  # parameter name -> (file, key in it)
        try:
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                        name = rename(key) if rename else key
                        if name is not None:
                            self._where[name] = (f, key)
        except (OSError, SafetensorError) as exc:
            raise ModelSpecError(f"corrupt safetensors file in {path}: {str(exc).strip().splitlines()[0]}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, shape: torch.Size, rows: slice | None = None) -> torch.Tensor:
        """The tensor stored for ``name`` in fp32 (only its ``rows`` when given: the rest is not read), checked
        against the ``shape`` the model's config gives the whole tensor."""
        from safetensors import SafetensorError, safe_open

        if name not in self._where:
            raise ModelSpecError(f"{self.path}: the checkpoint has no tensor {name}")
        f, key = self._where[name]
        try:
            with safe_open(str(f), framework="pt") as handle:
                part = handle.get_slice(key)
                stored = tuple(int(d) for d in part.get_shape())
                if stored != tuple(shape):
                    raise ModelSpecError(f"{self.path}: {key} is {list(stored)}, the model's config makes it "
                                         f"{list(shape)}")
                tensor = (part[rows] if rows is not None else handle.get_tensor(key)).to(torch.float32, copy=True)
        except (OSError, SafetensorError) as exc:
            raise ModelSpecError(f"corrupt safetensors file {f}: {str(exc).strip().splitlines()[0]}") from None
        return tensor


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and keep real buffers (rotary tables,
    embedding scales: computed from the config, not stored). What ``accelerate.init_empty_weights`` does; like
    it, process-wide while the block runs (a model is built in a fraction of a second: nothing else is)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    setattr(nn.Module, "register_parameter", on_meta)  # noqa: B010 - patched for the block's duration only
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", register)  # noqa: B010


def empty_model(config: Any) -> Any:
    """The causal LM of ``config`` in fp32, every parameter on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def fill_quantized(model: nn.Module, ckpt: Checkpoint, q: Any) -> None:
    """Give every meta tensor of the quantized ``model`` its value from ``ckpt``: a quantized module's stored
    bytes and scales from its fp32 weight (read, quantized, dropped), every other parameter as stored. A tensor
    shared by two modules (a tied LM head's bytes) is filled once and stays shared."""
    from lorafleet.export.compiler.quantize import QuantizedEmbedding, QuantizedLinear

    filled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (meta tensor, its value)
    owners: dict[int, list[str]] = {}  # id(stored bytes) -> the modules sharing them (a tied head and its embedding)
    for prefix, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear | QuantizedEmbedding):
            owners.setdefault(id(mod.qweight), []).append(_join(prefix, "weight"))
    with torch.no_grad():
        for prefix, mod in model.named_modules():
            if isinstance(mod, QuantizedLinear | QuantizedEmbedding) and mod.qweight.is_meta:
                if id(mod.qweight) not in filled:
                    stored_as = next((n for n in owners[id(mod.qweight)] if n in ckpt), _join(prefix, "weight"))
                    stored, scale = _quantized_rows(ckpt, stored_as, mod.qweight, mod.scale, _in(mod), q)
                    filled[id(mod.qweight)] = (mod.qweight, stored)
                    filled[id(mod.scale)] = (mod.scale, scale)
                mod._buffers["qweight"] = filled[id(mod.qweight)][1]
                mod._buffers["scale"] = filled[id(mod.scale)][1]
            for pname, param in list(mod._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in filled:
                    value = nn.Parameter(ckpt.read(_join(prefix, pname), param.shape), requires_grad=False)
                    filled[id(param)] = (param, value)
                mod._parameters[pname] = filled[id(param)][1]
            for bname, buf in list(mod._buffers.items()):  # a persistent buffer the checkpoint stores
                name = _join(prefix, bname)
                persistent = bname not in mod._non_persistent_buffers_set and name in ckpt
                if persistent and buf is not None and not buf.is_meta:
                    mod._buffers[bname] = ckpt.read(name, buf.shape).to(buf.dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelSpecError(f"{ckpt.path}: the checkpoint has no tensor for {len(left)} of the model's "
                             f"(e.g. {left[0]})")


QUANTIZE_ROWS = 8192  # rows of a matrix read and quantized at once (a 128k-vocabulary matrix: 16 pieces)


def _quantized_rows(ckpt: Checkpoint, name: str, qweight: torch.Tensor, scale: torch.Tensor, width: int,
                    q: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_weight`` of the stored matrix ``name``, read and quantized :data:`QUANTIZE_ROWS` rows at a
    time into the stored tensors' final buffers: every row's groups are quantized on their own, so the bytes are
    those of the whole matrix at once, while the fp32 rows and the quantizer's temporaries stay one piece's."""
    from lorafleet.export.compiler.quantize import quantize_weight

    rows = qweight.shape[0]
    stored = torch.empty(qweight.shape, dtype=qweight.dtype)  # (out, in) int8 or (out, in / 2) packed uint8
    scales = torch.empty(scale.shape, dtype=scale.dtype)  # (out, in / block)
    for start in range(0, rows, QUANTIZE_ROWS):
        stop = min(start + QUANTIZE_ROWS, rows)
        piece = ckpt.read(name, torch.Size((rows, width)), slice(start, stop))  # (stop - start, in) fp32
        stored[start:stop], scales[start:stop] = quantize_weight(piece, q)
        del piece
    return stored, scales


def _in(mod: nn.Module) -> int:
    return int(getattr(mod, "embedding_dim", None) or getattr(mod, "in_features"))  # noqa: B009


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@contextlib.contextmanager
def streamed_fp32(config: Any, ckpt: Checkpoint) -> Iterator[Any]:
    """The fp32 model of ``config`` whose forward reads each module's own parameters from ``ckpt`` just before
    the module runs and drops them after it (pre/post forward hooks on every module that owns parameters): an
    eager forward of the full-precision model that holds one module's weights at a time. For references
    (no autograd); a tied LM head reads the embedding's stored matrix."""
    model = empty_model(config)
    names: dict[int, list[str]] = {}  # id(meta parameter) -> every name it has (a tied head: two)
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    handles = []
    kept: dict[int, dict[str, nn.Parameter]] = {}  # id(module) -> its meta parameters while it runs

    def load(mod: nn.Module, _args: Any) -> None:
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                stored = next((n for n in names[id(p)] if n in ckpt), None)
                if stored is None:
                    raise ModelSpecError(f"{ckpt.path}: the checkpoint has no tensor {names[id(p)][0]}")
                mod._parameters[pname] = nn.Parameter(ckpt.read(stored, p.shape), requires_grad=False)
                kept.setdefault(id(mod), {})[pname] = p

    def drop(mod: nn.Module, _args: Any, _out: Any) -> None:
        for pname, p in kept.pop(id(mod), {}).items():
            mod._parameters[pname] = p

    for mod in model.modules():
        if any(p is not None for p in mod._parameters.values()):
            handles += [mod.register_forward_pre_hook(load), mod.register_forward_hook(drop)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


SHARD_BYTES = 2 << 30  # what each safetensors file of a written checkpoint holds at most


def write_random_checkpoint(config: Any, out: Path, seed: int) -> None:
    """A seeded random model of ``config`` written to ``out`` as a Hugging Face directory (``config.json``,
    bf16 safetensors shards of at most :data:`SHARD_BYTES` and their index, as ``save_pretrained`` writes a
    published checkpoint), one module at a time: each module's parameters are made, initialized by the model's
    own ``_init_weights``, written and dropped, so a model far larger than memory can be written. A tied LM
    head is stored once, as the embedding. Written through :func:`lorafleet.export.formats.atomic.atomic_dir`."""
    import json
    import os

    from lorafleet.export.formats.atomic import atomic_dir

    model = empty_model(config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total = 0, 0
    seen: set[int] = set()  # meta parameters written already (a tied head's is the embedding's)
    with atomic_dir(out, overwrite=True) as staging:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for prefix, mod in model.named_modules():
                own = {n: p for n, p in mod._parameters.items() if p is not None and p.is_meta and id(p) not in seen}
                if not own:
                    continue
                for n, p in own.items():
                    mod._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                model._init_weights(mod)
                for n, p in own.items():
                    seen.add(id(p))
                    tensor = mod._parameters[n].detach().to(torch.bfloat16)
                    mod._parameters[n] = p
                    nbytes = tensor.numel() * tensor.element_size()
                    if size and size + nbytes > SHARD_BYTES:
                        _write_shard(shards[-1], staging, len(shards))
                        shards.append({})
                        size = 0
                    shards[-1][_join(prefix, n)] = tensor
                    size, total = size + nbytes, total + nbytes
            _write_shard(shards[-1], staging, len(shards))
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):  # the count is known only now: shards are named at the end
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            os.replace(staging / f"part-{i}.safetensors", staging / name)
            weight_map.update(dict.fromkeys(shard, name))
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save_pretrained(staging)


def _write_shard(shard: dict[str, torch.Tensor], root: Path, i: int) -> None:
    from safetensors.torch import save_file

    save_file(shard, str(root / f"part-{i}.safetensors"), metadata={"format": "pt"})
    for k in shard:  # written: keep the names for the index, drop the bytes
        shard[k] = shard[k].new_empty(0)
