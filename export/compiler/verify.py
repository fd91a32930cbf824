"""Verification of compiled programs against eager transformers + PEFT, run inside export.

The oracle is the eager PEFT model on a fixed batch. For training programs the LoRA heads are first set to
a *probe* adapter with nonzero ``lora_A`` and ``lora_B`` (PEFT's default init zeroes ``lora_B``, which would
make every ``lora_A`` gradient zero and leave half the program unchecked); the same probe goes into the
runtime through its set-weights path, so that path is verified too. Each comparison is a :class:`Check`;
export writes them into the manifest and writes no package when one fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.adapter import PEFT_PREFIX, Adapter, LoraPair, peft_config
from lorafleet.export.formats.errors import ExportError
from lorafleet.export.formats.program import StepResult

if TYPE_CHECKING:
    import torch

    from lorafleet.export.formats.program import LoraSpec

# fp32 programs against fp32 eager: the logits bound, and bounds for the loss and the gradients
TOLERANCES = {
    "logits_max_abs_diff": 1e-3,
    "probe_logits_max_abs_diff": 1e-3,  # logits after new LoRA weights were set without re-export
    "loss_abs_diff": 1e-4,
    "grad_rel_max_abs_diff": 1e-3,  # max |Δgrad| / max |grad| over all LoRA tensors
    "lora_max_abs_diff": 0.0,  # the program's initial LoRA weights read back against the package adapter
    "lora_modules_mismatch": 0.0,  # modules whose LoRA tensors the artifact trains, against those requested
}

@dataclass(frozen=True)
class Check:
    rank: int
    artifact: str
    metric: str
    value: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.value <= self.limit  # NaN compares False: a NaN fails

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def probe_adapter(like: Adapter, spec: LoraSpec, *, seed: int = 1234) -> Adapter:
    """An adapter shaped like ``like`` with small random nonzero factors (for gradient checks)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mods = {name: LoraPair(torch.randn(p.lora_A.shape, generator=g) * 0.05,
                           torch.randn(p.lora_B.shape, generator=g) * 0.05, spec.scaling)
            for name, p in like.modules.items()}
    return Adapter(mods, peft_config(list(spec.target_modules), spec.r, spec.lora_alpha, use_rslora=spec.use_rslora))


def eager_step(peft_model: Any, loss_module: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
    """Loss and LoRA gradients of the eager PEFT model (the oracle); leaves no gradients behind."""
    from lorafleet.export.compiler.lora import lora_modules
    from lorafleet.export.compiler.quantize import recomputed_dequantization

    layers = lora_modules(peft_model)
    params = [p for m in layers.values() for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    for p in params:
        p.grad = None
    with recomputed_dequantization():  # a quantized base: one layer's weight dequantized at a time, as on device
        loss = loss_module(*batch)
        loss.backward()
    grads = {f"{PEFT_PREFIX}{name}.lora_{which}.weight": factors["default"].weight.grad.detach().clone()
             for name, m in layers.items() for which, factors in (("A", m.lora_A), ("B", m.lora_B))}
    for p in params:
        p.grad = None
    return StepResult(float(loss.detach()), grads)


def eager_logits(peft_model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return peft_model(input_ids=input_ids, use_cache=False).logits


def compare_logits(rank: int, artifact: str, got: Any, want: torch.Tensor,
                   metric: str = "logits_max_abs_diff") -> list[Check]:
    import torch

    got_t = torch.as_tensor(got, dtype=torch.float32)
    if tuple(got_t.shape) != tuple(want.shape):
        raise ExportError(f"rank {rank} {artifact}: logits have shape {tuple(got_t.shape)}, eager {tuple(want.shape)}")
    diff = float((got_t - want).abs().max())
    return [Check(rank, artifact, metric, diff, TOLERANCES[metric])]


def compare_step(rank: int, artifact: str, got: StepResult, want: StepResult) -> list[Check]:
    import torch

    got_m, want_m = got.by_module(), want.by_module()
    if set(got_m) != set(want_m):
        odd = sorted(set(got_m) ^ set(want_m))[:3]
        raise ExportError(f"rank {rank} {artifact}: gradients for modules {odd} exist on one side only")
    worst, scale = 0.0, 0.0
    for name, (ga, gb) in want_m.items():
        for ref, cand in ((ga, got_m[name][0]), (gb, got_m[name][1])):
            cand_t = torch.as_tensor(cand, dtype=torch.float32)
            worst = max(worst, float((cand_t - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    rel = worst / scale if scale > 0 else worst
    return [Check(rank, artifact, "loss_abs_diff", abs(got.loss - want.loss), TOLERANCES["loss_abs_diff"]),
            Check(rank, artifact, "grad_rel_max_abs_diff", rel, TOLERANCES["grad_rel_max_abs_diff"])]


def compare_adapters(rank: int, artifact: str, got: Adapter, want: Adapter) -> list[Check]:
    """Largest difference between two adapters' factors (an exact round trip gives 0)."""
    if set(got.modules) != set(want.modules):
        return [Check(rank, artifact, "lora_max_abs_diff", float("inf"), TOLERANCES["lora_max_abs_diff"])]
    diff = 0.0
    for name, p in want.modules.items():
        q = got.modules[name]
        diff = max(diff, float((q.lora_A - p.lora_A).abs().max()), float((q.lora_B - p.lora_B).abs().max()))
    return [Check(rank, artifact, "lora_max_abs_diff", diff, TOLERANCES["lora_max_abs_diff"])]


def compare_modules(rank: int, artifact: str, got: Iterable[str], want: Iterable[str]) -> list[Check]:
    """The modules an artifact holds trainable LoRA tensors for must be exactly the requested ones.

    ``want`` comes from the base model's own structure (every linear layer a target name selects, in every layer:
    :func:`lorafleet.export.compiler.lora.target_shapes`), not from the PEFT model under test, so a target list lost on
    the way into PEFT cannot pass by comparing the program with the same mis-adapted model.
    """
    got_set, want_set = set(got), set(want)
    if got_set != want_set:
        missing, extra = sorted(want_set - got_set), sorted(got_set - want_set)
        raise ExportError(f"verification failed: rank {rank} {artifact} trains LoRA on the wrong modules "
                          f"(missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                          f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}); no package written")
    return [Check(rank, artifact, "lora_modules_mismatch", 0.0, TOLERANCES["lora_modules_mismatch"])]


def verification_section(checks: list[Check], *, batch_size: int, seq_len: int, seed: int) -> dict[str, Any]:
    """The manifest's ``verification`` entry."""
    return {
        "passed": all(c.passed for c in checks),
        "batch": {"batch_size": batch_size, "seq_len": seq_len, "seed": seed},
        "tolerances": dict(TOLERANCES),
        "checks": [c.to_dict() for c in checks],
    }


def raise_if_failed(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ExportError(f"verification failed: rank {c.rank} {c.artifact} {c.metric} = {c.value:.3g} > "
                          f"{c.limit:g}{more}; no package written")
