"""What an export will take, before it runs: ``lorafleet export … --dry-run``.

Nothing is loaded. The model is built on the meta device from its config
(:func:`lorafleet.export.compiler.models.meta_model`), and the checks a real export makes before its first
minute run on it: OUT, ``--adapter``, target modules, every rank against ``min(in, out)``, ``seq_len``, the
quantization's group widths. Then the plan reports:

* **package size** — the foundation file of each runtime exactly: the frozen base stored once (fp32: 4 bytes
  a parameter, a tied head once; quantized: the stored bytes and fp32 rest that
  :func:`lorafleet.export.compiler.quantize.quantize_model` gives, computed here on the meta model), and each
  rank's initial adapter (4 bytes a trainable parameter). Each rank's programs are predicted from measured
  package sizes (:data:`RATES`): graph bytes per decoder layer plus a multiple of the LoRA factors' bytes (the
  ExecuTorch programs carry the LoRA state's initial values per method);
* **time and peak memory** — from rates measured on this project's 2-core x86-64 machine with no other load
  (:data:`RATES`; docs/BENCHMARKS.md "Export dry-run" has the runs they were fitted on and the held-out runs
  that check them): an ExecuTorch lowering or an ONNX export of a rank costs a fixed part, a part per decoder
  layer (the graph) and a part per GB of fp32 weights. An export that holds the fp32 model peaks at the
  runtimes' libraries plus a measured multiple of the fp32 weight bytes. A quantized base streamed from its
  checkpoint (:func:`lorafleet.export.compiler.models.has_checkpoint`) is never held in fp32: its ONNX export
  peaks at the libraries plus a measured multiple of the quantized foundation's bytes; its ExecuTorch
  lowering has not been measured streamed, so it keeps the fp32 rule (an upper bound). On the held-out exports
  the time came within 12 % and the fp32 peak within 6 %; a quantized export's peak is predicted on the high
  side (1.5× for the 1B int4 one). A faster CPU finishes sooner; the memory does not change with the CPU.

The plan says whether the predicted peak fits the memory free now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafleet.export.compiler.models import FIT_FRACTION

GB = 1e9


@dataclass(frozen=True)
class Rates:
    """Measured on the project's 2-core machine, nothing else running (docs/BENCHMARKS.md "Export dry-run":
    the fitted runs, and the runs that check the fit). GB: 1e9 bytes of fp32 weights."""

    load_s: float = 2.0
    load_s_per_gb: float = 4.5  # random:qwen2.5-0.5b: 11.4 s; random:llama-3.2-1b: 19.2 s
    onnx_rank_s: float = 1.3  # ONNX export + verification of a rank: random:tiny (2 layers) 1.9 s
    onnx_rank_s_per_layer: float = 0.30  # SmolLM2-135M (30 layers, 0.54 GB): 14.4 s
    onnx_rank_s_per_gb: float = 7.8  # Llama-3.2-1B-shaped (16 layers, 4.94 GB): 44.6 s
    onnx_rank_s_per_gb_quantized: float = 18.0  # random:qwen2.5-0.5b int4 (24 layers, 1.98 GB): 45 s, quantizing too
    # measuring ONNX Runtime's device memory of a step in a fresh process (2026-12-07): random:tiny 5 s (importing
    # ORT), SmolLM2-135M fp32 about 20 s, Llama-3.2-1B-shaped int4 about 100 s beside other jobs
    onnx_measure_s: float = 5.0
    onnx_measure_s_per_gb: float = 20.0
    et_rank_s: float = 4.6  # ExecuTorch lowering of both programs + verification, per rank
    et_rank_s_per_layer: float = 5.7  # random:tiny (2 layers): 16 s; SmolLM2-135M (30 layers, 0.54 GB): 195 s
    et_rank_s_per_gb: float = 35.2  # Llama-3.2-1B-shaped (16 layers, 4.94 GB): 270 s
    et_quantized_factor: float = 1.5  # the int8 graph lowered in 1473 s against 980 s for fp32
    runtime_bytes: float = 1.0 * 2**30  # torch, ONNX Runtime, ExecuTorch and transformers in the process
    peak_per_fp32_byte: dict[str, float] = field(default_factory=lambda: {
        "executorch": 3.0,  # 1B: 15.7 GB PSS for 4.94 GB of weights; SmolLM2-135M: 2.2 GiB
        "onnx": 1.9,  # 1B ONNX only: 10.1 GB; SmolLM2-135M: 1.8 GiB
        "quantized": 3.2})  # random:qwen2.5-0.5b int4 ONNX: 6.8 GiB
    # a streamed quantized base, ONNX: the peak above the libraries per byte of the quantized foundation
    # (docs/BENCHMARKS.md "Streamed export"): Llama-3.2-1B-shaped int4 4.0 GiB PSS for 0.77 GB stored (fit);
    # random:llama-3.2-3b int4 7.77 GiB for 2.01 GB (held out: predicted 14 % high)
    onnx_peak_per_stored_byte_streamed: float = 4.2
    onnx_bytes_per_layer: float = 61e3  # SmolLM2-135M: rank-4 ONNX files 2.77 MB, rank-32 9.22 MB (30 layers)
    onnx_factor_multiple: float = 1.0  # × the LoRA factors' fp32 bytes
    et_bytes_per_layer: float = 98e3  # SmolLM2-135M: rank-4 programs 6.34 MB, rank-32 29.65 MB
    et_factor_multiple: float = 3.6
    quantized_graph_factor: float = 2.0  # the dequantizations: random:tiny int4 programs 1.8–2.0× fp32's


RATES = Rates()


@dataclass(frozen=True)
class ExportPlan:
    spec: str
    model_type: str
    parameters: int
    num_layers: int
    quantize: str
    runtimes: tuple[str, ...]
    ranks: tuple[int, ...]
    foundation_bytes: dict[str, int]  # runtime -> its shared foundation file
    rank_bytes: dict[int, dict[str, int]]  # rank -> {"adapter", runtime...} -> bytes
    seconds: dict[str, float]  # "load", "onnx", "executorch" (all ranks)
    peak_memory_bytes: int
    available_memory_bytes: int
    step_memory_bytes: dict[int, int]  # rank -> the manifest's training-step estimate

    @property
    def package_bytes(self) -> int:
        return sum(self.foundation_bytes.values()) + sum(sum(v.values()) for v in self.rank_bytes.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= FIT_FRACTION * self.available_memory_bytes


def plan_export(cfg: Any, rates: Rates = RATES) -> ExportPlan:
    """The plan of ``cfg`` (an :class:`~lorafleet.export.compiler.pipeline.ExportConfig`); raises what the
    export's early checks would raise."""
    import psutil

    from lorafleet.export.compiler.estimates import estimate
    from lorafleet.export.compiler.lora import trainable_parameters
    from lorafleet.export.compiler.models import meta_model
    from lorafleet.export.compiler.pipeline import check_output, check_targets, read_init_adapter
    from lorafleet.export.compiler.quantize import check_quantizable, quantize_model

    check_output(cfg)
    init = read_init_adapter(cfg)
    lm = meta_model(cfg.model)
    shapes = check_targets(lm.model, cfg, init)
    info = lm.info
    fp32_bytes = 4 * info.num_parameters
    q = cfg.quantization
    weight_bytes, step_weights = fp32_bytes, None
    if q.enabled:
        check_quantizable(lm.model, q)
        summary = quantize_model(lm.model, q)  # on meta tensors: the stored sizes, nothing computed
        assert summary is not None
        weight_bytes = summary.stored_bytes + summary.unquantized_bytes
        step_weights = summary.weight_memory_bytes  # what the manifest's estimates use
    gb = fp32_bytes / GB
    layers = info.num_layers
    foundation = {rt: weight_bytes for rt in cfg.runtimes}
    rank_bytes: dict[int, dict[str, int]] = {}
    graph_layers = layers * (rates.quantized_graph_factor if q.enabled else 1.0)
    for r in cfg.ranks:
        factors = 4 * trainable_parameters(shapes, r)
        files = {"adapter": factors}
        if "onnx" in cfg.runtimes:
            files["onnx"] = round(rates.onnx_bytes_per_layer * graph_layers + rates.onnx_factor_multiple * factors)
        if "executorch" in cfg.runtimes:
            files["executorch"] = round(rates.et_bytes_per_layer * graph_layers + rates.et_factor_multiple * factors)
        rank_bytes[r] = files
    n = len(cfg.ranks)
    seconds = {"load": rates.load_s + rates.load_s_per_gb * gb}
    if "onnx" in cfg.runtimes:
        per_gb = rates.onnx_rank_s_per_gb_quantized if q.enabled else rates.onnx_rank_s_per_gb
        seconds["onnx"] = n * (rates.onnx_rank_s + rates.onnx_rank_s_per_layer * layers + per_gb * gb
                               + rates.onnx_measure_s + rates.onnx_measure_s_per_gb * gb)
    if "executorch" in cfg.runtimes:
        per_rank = rates.et_rank_s + rates.et_rank_s_per_layer * layers + rates.et_rank_s_per_gb * gb
        seconds["executorch"] = n * per_rank * (rates.et_quantized_factor if q.enabled else 1.0)
    peak = round(rates.runtime_bytes + peak_above_runtimes(cfg, rates, fp32_bytes, weight_bytes))
    step = {r: estimate(info, list(cfg.target_modules), r, cfg.seq_len, cfg.batch_size,
                        weight_bytes=step_weights).training_peak_memory_bytes for r in cfg.ranks}
    return ExportPlan(cfg.model, info.model_type, info.num_parameters, layers, cfg.quantize, tuple(cfg.runtimes),
                      tuple(cfg.ranks), foundation, rank_bytes, seconds, peak,
                      psutil.virtual_memory().available, step)


def peak_above_runtimes(cfg: Any, rates: Rates, fp32_bytes: int, stored_bytes: int) -> float:
    """The export's peak memory above its libraries: a multiple of the fp32 weights while the export holds the
    fp32 model, of the quantized foundation when the base is streamed (ONNX Runtime only: measured)."""
    from lorafleet.export.compiler.models import has_checkpoint

    q = cfg.quantization
    if q.enabled and has_checkpoint(cfg.model) and set(cfg.runtimes) == {"onnx"}:
        return rates.onnx_peak_per_stored_byte_streamed * stored_bytes
    k = max(rates.peak_per_fp32_byte[key] for key in [*cfg.runtimes, *(["quantized"] if q.enabled else [])])
    return k * fp32_bytes
