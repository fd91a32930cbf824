"""The export pipeline: a foundation model becomes an edge package, one named stage at a time.

    check_output → read_init_adapter → load → check_targets
    → for each rank: attach LoRA → wrap loss → export ONNX + verify → lower ExecuTorch (in a forked child) → detach
    → write the shared ExecuTorch foundation → for each rank: verify ExecuTorch (loaded with that file)
    → save (hash files, write the manifest, rename into place)

The runtime-specific stages live in :mod:`lorafleet.export.compiler.stages`. ExecuTorch programs are verified after the
foundation file all ranks share has been written, so what is checked is what ships.

Cheap checks come first, so bad input (unknown runtime, rank ≤ 0, OUT exists, an ``--adapter`` of too low a
rank) fails in milliseconds without loading a model; target modules and rank bounds are checked against the
loaded model's real linear layers. Everything is staged in a temporary directory next to OUT
(:func:`lorafleet.export.formats.package.write_package`) and appears only if every program passed verification.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafleet.export.compiler.estimates import estimate
from lorafleet.export.compiler.lora import (
    attach_lora,
    check_ranks,
    conform,
    detach_lora,
    read_lora,
    target_shapes,
    trainable_parameters,
)
from lorafleet.export.compiler.stages import (
    RankContext,
    export_onnx_rank,
    lower_executorch_rank,
    verify_executorch_rank,
)
from lorafleet.export.compiler.verify import Check, compare_modules, raise_if_failed, verification_section
from lorafleet.export.formats.adapter import Adapter, read_adapter, write_adapter
from lorafleet.export.formats.errors import AdapterError, ConfigError, PackageError
from lorafleet.export.formats.manifest import MANIFEST_FILE, RUNTIMES, Manifest
from lorafleet.export.formats.package import PackageSpec, RankRecord, rank_paths, write_package
from lorafleet.export.formats.program import LoraSpec
from lorafleet.export.formats.quantization import Quantization

VERIFY_SEED = 0


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``lorafleet export`` takes; validated on construction (errors name field and value)."""

    model: str
    ranks: tuple[int, ...]
    target_modules: tuple[str, ...]
    out: Path
    lora_alpha: float = 16.0
    seq_len: int = 64
    batch_size: int = 1
    adapter: Path | None = None
    runtimes: tuple[str, ...] = RUNTIMES
    quantize: str = "none"
    force: bool = False

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ConfigError("ranks is empty")
        for r in self.ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"ranks: every rank must be a positive integer, got {r!r}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"ranks: duplicate rank in {list(self.ranks)}")
        if not self.target_modules or any(not t for t in self.target_modules):
            raise ConfigError(f"target_modules must be non-empty names, got {list(self.target_modules)}")
        if not self.runtimes:
            raise ConfigError("runtimes is empty")
        for rt in self.runtimes:
            if rt not in RUNTIMES:
                raise ConfigError(f"runtimes: unknown runtime {rt!r} (known: {', '.join(RUNTIMES)})")
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ConfigError(f"runtimes: duplicate runtime in {list(self.runtimes)}")
        object.__setattr__(self, "quantize", str(Quantization.parse(self.quantize)))
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 (the loss predicts token t+1), got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        object.__setattr__(self, "ranks", tuple(sorted(self.ranks)))
        object.__setattr__(self, "out", Path(self.out))

    @property
    def quantization(self) -> Quantization:
        return Quantization.parse(self.quantize)

    def lora(self, r: int) -> LoraSpec:
        return LoraSpec(r, self.target_modules, self.lora_alpha)


@dataclass
class ExportResult:
    manifest: Manifest
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, summed over ranks


# --- the stages -----------------------------------------------------------------------------------------

def check_output(cfg: ExportConfig) -> None:
    """OUT must not exist (unless ``force`` and it is a package) and its parent must be writable."""
    import os

    out = cfg.out
    if out.exists() and not cfg.force:
        raise PackageError(f"output {out} already exists (use --force to replace it)")
    if out.exists() and not (out / MANIFEST_FILE).is_file():
        raise PackageError(f"output {out} exists and is not an edge package; refusing to replace it")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PackageError(f"cannot write to {parent}: not a writable directory")


def read_init_adapter(cfg: ExportConfig) -> Adapter | None:
    """The ``--adapter`` every rank starts from; its rank must cover the largest requested rank."""
    if cfg.adapter is None:
        return None
    adapter = read_adapter(cfg.adapter)
    low = min(adapter.ranks)
    if max(cfg.ranks) > low:
        raise AdapterError(f"requested rank {max(cfg.ranks)} is above the rank {low} of --adapter {cfg.adapter}")
    return adapter


def load(cfg: ExportConfig) -> Any:
    """The foundation model, eager attention (SDPA's backward is not core ATen); with its tokenizer when the
    base is quantized (the quality check reads a fixed text). A quantized base with a safetensors checkpoint
    is streamed from it, quantized as it is read (never whole in fp32); any other spec loads in fp32 and is
    quantized by :func:`quantize_base`."""
    from lorafleet.export.compiler.models import has_checkpoint, load_model

    q = cfg.quantization
    streamed = q.enabled and has_checkpoint(cfg.model)
    lm = load_model(cfg.model, attn_implementation="eager", with_tokenizer=q.enabled,
                    quantization=q if streamed else None)
    if q.enabled and not streamed:
        from lorafleet.export.compiler.quantize import check_quantizable

        check_quantizable(lm.model, q)
    return lm


def quantize_base(lm: Any, q: Quantization, seq_len: int) -> dict[str, Any]:
    """The manifest's ``quantization`` section (what was quantized, the stored bytes, the weight memory of a
    step, and what it costs against fp32 on a fixed text), quantizing ``lm.model`` in place unless it was
    loaded quantized; then the fp32 reference is computed module by module from the checkpoint."""
    from lorafleet.export.compiler.quantize import quality_probe, quantize_model

    if lm.quantization is None:
        probe = quality_probe(lm.model, lm.tokenizer, seq_len)
        summary = quantize_model(lm.model, q)
    else:
        from lorafleet.export.compiler.models import fp32_reference

        with fp32_reference(lm.info.spec, attn_implementation="eager") as fp32:
            probe = quality_probe(fp32, lm.tokenizer, seq_len)
        summary = lm.quantization
    assert summary is not None
    return {**summary.to_dict(), "against_fp32": probe.finish(lm.model)}  # weight_memory_bytes: the estimates' term


def check_targets(model: Any, cfg: ExportConfig, init: Adapter | None) -> dict[str, tuple[int, int]]:
    """Target modules exist, every rank fits min(in, out), the adapter covers exactly these modules."""
    shapes = target_shapes(model, cfg.target_modules)
    check_ranks(shapes, list(cfg.ranks))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    if init is not None:
        conform(init, cfg.lora(min(cfg.ranks)), expected=set(shapes))
        for name, pair in init.modules.items():
            if pair.shape != shapes[name]:
                raise AdapterError(f"--adapter module {name} is {pair.shape[0]} × {pair.shape[1]}, "
                                   f"the model's is {shapes[name][0]} × {shapes[name][1]}")
    return shapes


# --- per rank -------------------------------------------------------------------------------------------

def compile_rank(cfg: ExportConfig, ctx: RankContext, model: Any, r: int,
                 init: Adapter | None) -> tuple[Any, list[Check]]:
    """attach → wrap loss → export ONNX (+ verify) → lower ExecuTorch → detach; returns the base model."""
    from lorafleet.export.compiler.loss import CausalLMLoss

    spec = cfg.lora(r)
    ctx.log(f"rank {r}: attach LoRA")
    peft_model = ctx.timed("attach", attach_lora, model, spec, conform(init, spec, None) if init else None)
    peft_model.eval()
    ctx.initial[r] = read_lora(peft_model, spec, base_model=cfg.model)
    checks = compare_modules(r, "adapter", ctx.initial[r].modules, ctx.modules)
    write_adapter(ctx.initial[r], ctx.writer.path(r, "adapter"))
    if "onnx" in cfg.runtimes:
        ctx.log(f"rank {r}: export ONNX Runtime training artifacts and verify them")
        checks += export_onnx_rank(ctx, peft_model, CausalLMLoss(peft_model), spec)
    if "executorch" in cfg.runtimes:
        ctx.log(f"rank {r}: lower ExecuTorch inference and training programs")
        lower_executorch_rank(ctx, peft_model, spec)
    return detach_lora(peft_model), checks


def verify_executorch(cfg: ExportConfig, ctx: RankContext, model: Any) -> tuple[Any, list[Check]]:
    """Write the shared ``.ptd``, then check every rank's ExecuTorch programs loaded with it."""
    assert ctx.et_store is not None
    ctx.log("write the shared ExecuTorch foundation")
    ctx.timed("lower_executorch", ctx.et_store.write, ctx.writer.foundation("executorch"))
    checks: list[Check] = []
    for r in cfg.ranks:
        ctx.log(f"rank {r}: verify ExecuTorch programs")
        spec = cfg.lora(r)
        peft_model = attach_lora(model, spec, ctx.initial[r])
        peft_model.eval()
        checks += ctx.timed("verify", verify_executorch_rank, ctx, peft_model, spec)
        model = detach_lora(peft_model)
    return model, checks


def device_memory(cfg: ExportConfig, ctx: RankContext, r: int) -> dict[str, dict[str, int]]:
    """Rank ``r``'s device memory of a training step per runtime. ExecuTorch: read from the written
    ``training.pte`` and the shared ``.ptd``; ONNX Runtime, which stores no memory plan: measured in a fresh
    process training the written artifacts (:mod:`lorafleet.export.compiler.onnx.memory`; a failed measurement is
    logged and leaves that runtime to the formula)."""
    paths = rank_paths(r)
    out: dict[str, dict[str, int]] = {}
    training = ctx.writer.root / paths["executorch_training"]
    if ctx.et_store is not None and training.is_file():
        from lorafleet.export.compiler.executorch.memory import program_memory

        out["executorch"] = ctx.timed("verify", program_memory, training, ctx.writer.foundation("executorch"))
    artifacts = ctx.writer.root / paths["onnx_training"]
    if ctx.onnx_shared is not None and artifacts.is_dir():
        from lorafleet.export.compiler.onnx.memory import program_memory as onnx_memory

        ctx.log(f"rank {r}: measure ONNX Runtime's device memory of a training step")
        try:
            out["onnx"] = ctx.timed("verify", onnx_memory, artifacts, (cfg.batch_size, cfg.seq_len))
        except PackageError as exc:  # the rank is verified: a failed measurement costs its figure, not the package
            ctx.log(f"rank {r}: {exc}; the manifest keeps the formula for onnx")
    return out


def release_memory() -> None:
    """Collect reference cycles and hand freed heap pages back to the OS (glibc), between ranks."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


# --- the whole pipeline ---------------------------------------------------------------------------------

def rank_progress(r: int, took: list[float], total: int) -> str:
    """``rank R compiled in S s (k/n ranks)``, with an estimate of what the remaining ranks take: the mean of
    the ranks done so far (a rank's cost hardly depends on r: the frozen graph dominates)."""
    done = len(took)
    text = f"rank {r} compiled in {took[-1]:.0f} s ({done}/{total} ranks"
    if done == total:
        return text + ")"
    return text + f", about {(total - done) * sum(took) / done:.0f} s left for the rest)"


def run_export(cfg: ExportConfig, log: Callable[[str], None] = lambda _msg: None) -> ExportResult:
    """Compile, verify and write the package ``cfg.out``. Raises a :class:`LorafleetError` on bad input or
    failed verification, leaving nothing behind."""
    from lorafleet.export.compiler.loss import example_batch

    check_output(cfg)
    init = read_init_adapter(cfg)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"load {cfg.model}")
    lm = load(cfg)
    seconds["load"] = time.perf_counter() - t0
    shapes = check_targets(lm.model, cfg, init)
    section = lm.info
    batch = example_batch(section.vocab_size, cfg.batch_size, cfg.seq_len, seed=VERIFY_SEED)
    model = lm.model
    quantization: dict[str, Any] = {}
    if cfg.quantization.enabled:
        log(f"compare the {cfg.quantize} base streamed from its checkpoint with fp32 on a fixed text" if lm.streamed
            else f"quantize the base weights ({cfg.quantize})")
        t0 = time.perf_counter()
        quantization = quantize_base(lm, cfg.quantization, cfg.seq_len)
        seconds["quantize"] = time.perf_counter() - t0
    with write_package(cfg.out, overwrite=cfg.force) as writer, contextlib.ExitStack() as stack:
        ctx = RankContext(writer, batch, seconds, log, modules=frozenset(shapes))
        if "onnx" in cfg.runtimes:
            from lorafleet.export.compiler.onnx.graph import SharedExternalData

            ctx.onnx_shared = SharedExternalData(writer.foundation("onnx"))
        if "executorch" in cfg.runtimes:
            from lorafleet.export.compiler.executorch import FoundationStore

            ctx.et_store = FoundationStore()
            ctx.et_parts = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=".lorafleet-et-", dir=writer.root.parent)))
        checks: list[Check] = []
        took: list[float] = []
        for r in cfg.ranks:
            t0 = time.perf_counter()
            model, rank_checks = compile_rank(cfg, ctx, model, r, init)
            checks += rank_checks
            release_memory()  # between ranks: the peak stays one rank's (docs/BENCHMARKS.md)
            took.append(time.perf_counter() - t0)
            log(rank_progress(r, took, len(cfg.ranks)))
        if ctx.et_store is not None:
            model, et_checks = verify_executorch(cfg, ctx, model)
            checks += et_checks
        raise_if_failed(checks)
        device = {r: device_memory(cfg, ctx, r) for r in cfg.ranks}
        t1 = time.perf_counter()
        weights = quantization.get("weight_memory_bytes")
        records = [RankRecord(r, trainable_parameters(shapes, r),
                              replace(estimate(section, list(cfg.target_modules), r, cfg.seq_len, cfg.batch_size,
                                               weight_bytes=weights), device_memory=device[r]))
                   for r in cfg.ranks]
        spec = PackageSpec(section, sorted(cfg.target_modules), cfg.lora_alpha, cfg.seq_len, cfg.batch_size,
                           list(cfg.runtimes), cfg.quantize, quantization=quantization)
        manifest = writer.finish(spec, records, verification_section(
            checks, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=VERIFY_SEED))
        seconds["save"] = time.perf_counter() - t1
    return ExportResult(manifest, cfg.out, seconds)
