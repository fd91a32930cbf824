"""PEFT LoRA adapters on disk and in memory — the format devices, server and CLI all speak.

On disk an adapter is a PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r), so it
loads with ``PeftModel.from_pretrained``. In memory it is an :class:`Adapter`: one :class:`LoraPair` per
target module, each carrying its own PEFT scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
rsLoRA, ``rank_pattern`` / ``alpha_pattern`` respected), so ΔW = scaling · B @ A is always explicit.

Client adapters are untrusted: only safetensors is read (a directory holding only ``adapter_model.bin``
is refused, never unpickled), every key must be a LoRA factor stored once, shapes must agree, values must be
finite, and the config must mean what PEFT will make of it: every module covered by ``target_modules`` (else
PEFT silently ignores its weights), no ``modules_to_save`` (an adapter of LoRA factors only), ``lora_alpha``
defaulting to PEFT's 8. Config patterns are regular expressions matched as PEFT matches them, each match
bounded in time (:data:`PATTERN_TIMEOUT`), so a pathological pattern is an error, not a hang.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.atomic import atomic_dir
from lorafleet.export.formats.errors import AdapterError

if TYPE_CHECKING:
    import torch

    from lorafleet.export.formats.program import LoraSpec

StateDict = dict[str, "torch.Tensor"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig.lora_alpha's default
PATTERN_TIMEOUT = 1.0  # seconds one config pattern may take to match one module name
# The one LoRA key rule: PEFT's saved keys (base_model.model.<module>.lora_A.weight), its parameter names (with the
# adapter name: ...lora_A.default.weight) and the same inside any wrapper (model.base_model.model....).
LORA_KEY = re.compile(r"^(?:.*?base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])"
                      r"(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")


def parse_lora_key(name: str) -> tuple[str, str] | None:
    """``(module inside the base model, "A" | "B")`` of a LoRA key or parameter name, or ``None``."""
    m = LORA_KEY.match(name)
    return None if m is None else (m["module"], m["which"])


def peft_key(name: str) -> str:
    """The key PEFT saves a LoRA parameter under (``base_model.model.<module>.lora_A.weight``)."""
    parsed = parse_lora_key(name)
    if parsed is None:
        raise ValueError(f"not a PEFT LoRA parameter name: {name!r}")
    return f"{PEFT_PREFIX}{parsed[0]}.lora_{parsed[1]}.weight"


def scaling_for(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class LoraPair:
    """One target module's LoRA factors: ΔW = scaling · lora_B @ lora_A."""

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scaling: float

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the base linear this pair adapts."""
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense update ΔW (out × in). For tests and small modules only."""
        return self.scaling * (self.lora_B @ self.lora_A)


@dataclass
class Adapter:
    """A LoRA adapter: factors per module (names inside the base model, e.g.
    ``model.layers.0.self_attn.q_proj``) plus PEFT config metadata (target modules, base model...)."""

    modules: dict[str, LoraPair]
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # lorafleet's own (``lorafleet.*`` keys), in safetensors

    @property
    def ranks(self) -> set[int]:
        return {p.r for p in self.modules.values()}

    @property
    def r(self) -> int:
        """The adapter's rank: the largest module rank."""
        return max(self.ranks)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def state_dict(self) -> StateDict:
        """PEFT's saved keys → tensors."""
        sd: StateDict = {}
        for name, p in self.modules.items():
            sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = p.lora_A
            sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = p.lora_B
        return sd

    def num_parameters(self) -> int:
        return sum(p.lora_A.numel() + p.lora_B.numel() for p in self.modules.values())


def peft_config(target_modules: list[str], r: int, lora_alpha: float, *, use_rslora: bool = False,
                base_model: str | None = None, **extra: Any) -> dict[str, Any]:
    """A minimal PEFT ``LoraConfig`` dict for ``adapter_config.json``."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
        "target_modules": sorted(target_modules), "rank_pattern": {}, "alpha_pattern": {},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
    }
    cfg.update(extra)
    return cfg


def module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The ``(r, lora_alpha)`` PEFT assigns to ``module`` under ``config`` (patterns matched as PEFT does:
    ``peft.utils.other.get_pattern_key``)."""
    r = config.get("r")
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for key, value in _patterns(config, "rank_pattern").items():
        if _match(rf"(.*\.)?({key})$", module, "rank_pattern", key, full=False):
            r = value
            break
    for key, value in _patterns(config, "alpha_pattern").items():
        if _match(rf"(.*\.)?({key})$", module, "alpha_pattern", key, full=False):
            alpha = value
            break
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"adapter_config.json: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"adapter_config.json: lora_alpha must be a positive number, got {alpha!r}")
    return r, float(alpha)


def covered(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT would put LoRA on ``module`` under ``config``'s ``target_modules`` / ``exclude_modules``
    (``peft.tuners.tuners_utils.check_target_module_exists``: a string is a full-match regular expression, a
    list names modules exactly or by their last dotted parts)."""
    if _selects(config.get("exclude_modules"), module, "exclude_modules"):
        return False
    targets = config.get("target_modules")
    if targets == "all-linear":
        return module.rsplit(".", 1)[-1] != "lm_head"
    return _selects(targets, module, "target_modules")


def _selects(spec: Any, module: str, field_name: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return _match(spec, module, field_name, spec, full=True)
    if not isinstance(spec, list | tuple) or not all(isinstance(t, str) for t in spec):
        raise AdapterError(f"adapter_config.json: {field_name} must be a string or a list of names, got {spec!r}")
    return module in spec or any(module.endswith(f".{t}") for t in spec)


def _patterns(config: dict[str, Any], field_name: str) -> dict[str, Any]:
    value = config.get(field_name) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"adapter_config.json: {field_name} must be an object, got {value!r}")
    return value


def _match(pattern: str, text: str, field_name: str, key: str, *, full: bool) -> bool:
    """A PEFT pattern match with a time bound; a bad or pathological pattern is an :class:`AdapterError`."""
    import regex

    try:
        compiled = regex.compile(pattern)
        found = (compiled.fullmatch if full else compiled.match)(text, timeout=PATTERN_TIMEOUT)
    except regex.error as exc:
        raise AdapterError(f"adapter_config.json: {field_name} {key!r} is not a valid regular expression "
                           f"({exc})") from None
    except TimeoutError:
        raise AdapterError(f"adapter_config.json: {field_name} {key!r} took over {PATTERN_TIMEOUT:g} s to match "
                           f"{text!r} (a pathological regular expression); refusing it") from None
    return found is not None


def weights_file(path: Path) -> Path:
    """The safetensors file of the adapter directory ``path``; a pickle-only or missing one is an error."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).exists():
            raise AdapterError(f"{path} holds only a pickle ({PICKLE_FILE}); lorafleet never unpickles "
                               f"adapters: save it as {WEIGHTS_FILE}")
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}")
    return weights


def read_adapter(path: str | Path, *, check_finite: bool = True) -> Adapter:
    """Read and check a PEFT adapter directory (safetensors only). Raises :class:`AdapterError`."""
    path = Path(path)
    weights = weights_file(path)
    config = _read_config(path / CONFIG_FILE)
    tensors = _read_safetensors(weights)
    adapter = adapter_from_state_dict(tensors, config, check_finite=check_finite, origin=str(path))
    adapter.metadata = _read_metadata(weights)
    return adapter


def for_base_model(adapter: Adapter, spec: str) -> Adapter:
    """``adapter`` naming its base model for Hugging Face: ``base_model_name_or_path`` a model ``transformers``
    loads (:func:`lorafleet.export.formats.hub.hf_base_model`; ``None`` if there is none) and the lorafleet
    ``spec`` kept in its metadata. Tensors are shared, not copied."""
    from lorafleet.export.formats.hub import SPEC_KEY, hf_base_model

    return replace(adapter, config={**adapter.config, "base_model_name_or_path": hf_base_model(spec)},
                   metadata={**adapter.metadata, SPEC_KEY: spec})


def adapter_from_state_dict(tensors: StateDict, config: dict[str, Any], *, check_finite: bool = True,
                            origin: str = "adapter") -> Adapter:
    """Build an :class:`Adapter` from PEFT keys, checking keys, shapes, dtypes and (optionally) finiteness."""
    import torch

    halves: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        if m is None:
            raise AdapterError(f"{origin}: unexpected tensor {key!r} (only lora_A/lora_B weights are accepted)")
        if (m["module"], m["which"]) in keys:
            raise AdapterError(f"{origin}: module {m['module']}'s lora_{m['which']} is stored under two keys "
                               f"({keys[m['module'], m['which']]!r} and {key!r}); PEFT would load only one")
        keys[m["module"], m["which"]] = key
        halves.setdefault(m["module"], {})[m["which"]] = t
    if not halves:
        raise AdapterError(f"{origin}: no LoRA tensors")
    if config.get("modules_to_save"):
        raise AdapterError(f"{origin}: modules_to_save {config['modules_to_save']!r} is not supported (lorafleet "
                           f"adapters hold LoRA factors only)")
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraPair] = {}
    for name in sorted(halves):
        pair = halves[name]
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{origin}: module {name} lacks lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise AdapterError(f"{origin}: module {name} has inconsistent shapes lora_A {tuple(a.shape)}, "
                               f"lora_B {tuple(b.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{origin}: module {name} is not floating point ({a.dtype}, {b.dtype})")
        if check_finite and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{origin}: module {name} has NaN or Inf values")
        if config.get("target_modules") is not None and not covered(config, name):
            raise AdapterError(f"{origin}: module {name} is not covered by target_modules "
                               f"{config.get('target_modules')!r}: PEFT would ignore its weights")
        r, alpha = module_rank_alpha(config, name)
        if r != a.shape[0]:
            raise AdapterError(f"{origin}: module {name} has rank {a.shape[0]} but its config says {r}")
        modules[name] = LoraPair(a, b, scaling_for(r, alpha, use_rslora))
    return Adapter(modules, dict(config))


def write_adapter(adapter: Adapter, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT directory at ``out`` atomically (temporary directory, then rename).

    ``r`` / ``lora_alpha`` / ``rank_pattern`` / ``alpha_pattern`` are derived from the modules' actual
    ranks and scalings, so the tensors are written unchanged and PEFT reproduces every ΔW exactly.
    """
    from safetensors.torch import save_file

    config = {**adapter.config, **_scaling_fields(adapter)}
    config.setdefault("peft_type", "LORA")
    config.setdefault("task_type", "CAUSAL_LM")
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.modules})
    config["target_modules"] = config.get("target_modules") or targets
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={**adapter.metadata, "format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)


def truncate(adapter: Adapter, r: int) -> Adapter:
    """The first ``r`` rank components of every module (HetLoRA/FlexLoRA distribution), same scaling.

    ΔW of the result is exactly the sum of the first ``r`` components of ΔW; ``lora_alpha`` is adjusted
    in the written config so PEFT applies the same scaling at the new rank.
    """
    if r <= 0:
        raise AdapterError(f"rank must be positive, got {r}")
    if r > adapter.r:
        raise AdapterError(f"cannot truncate a rank-{adapter.r} adapter to rank {r}")
    mods = {n: LoraPair(p.lora_A[:r].clone(), p.lora_B[:, :r].clone(), p.scaling)
            for n, p in adapter.modules.items()}
    return Adapter(mods, dict(adapter.config))


def rescale(adapter: Adapter, lora_alpha: float, *, use_rslora: bool = False) -> Adapter:
    """The same ΔW, expressed at scaling ``lora_alpha / r`` (or ``/ sqrt(r)``): ratios folded into B.

    A packaged program has its ``lora_alpha`` compiled in; an adapter arriving with another scaling is
    rescaled before its tensors are loaded into the program.
    """
    mods = {}
    for n, p in adapter.modules.items():
        s = scaling_for(p.r, lora_alpha, use_rslora)
        mods[n] = LoraPair(p.lora_A, p.lora_B * (p.scaling / s), s)
    cfg = {**adapter.config, "lora_alpha": lora_alpha, "use_rslora": use_rslora}
    return Adapter(mods, cfg)


def with_modules(adapter: Adapter, modules: dict[str, LoraPair]) -> Adapter:
    """A copy of ``adapter`` (same metadata) holding ``modules``."""
    return replace(adapter, modules=modules, config=dict(adapter.config))


# --- internals ------------------------------------------------------------------------------------------

def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path.parent} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not supported")
    return config


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError on corrupt headers
        raise AdapterError(f"corrupt or truncated safetensors file {path}: {str(exc).splitlines()[0]}") from exc


def _read_metadata(path: Path) -> dict[str, str]:
    """The ``lorafleet.*`` entries of a safetensors header (others, e.g. ``format``, are not ours)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: v for k, v in meta.items() if k.startswith("lorafleet.")}


def _scaling_fields(adapter: Adapter) -> dict[str, Any]:
    """``r``, ``lora_alpha``, patterns and ``use_rslora`` reproducing every module's rank and scaling."""
    if not adapter.modules:
        raise AdapterError("cannot write an adapter with no modules")
    use_rslora = adapter.use_rslora

    def alphas(rs: bool) -> dict[str, float]:
        return {n: _tidy(p.scaling * (math.sqrt(p.r) if rs else p.r)) for n, p in adapter.modules.items()}

    ranks = {n: p.r for n, p in adapter.modules.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    alpha = alphas(use_rslora)
    a0 = Counter(alpha.values()).most_common(1)[0][0]
    uniform = all(r == r0 for r in ranks.values()) and all(a == a0 for a in alpha.values())
    if use_rslora and not uniform:  # PEFT forbids rsLoRA with patterns: express the same scalings plainly
        use_rslora, alpha = False, alphas(False)
        a0 = Counter(alpha.values()).most_common(1)[0][0]
    return {
        "r": r0, "lora_alpha": a0, "use_rslora": use_rslora,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(n): a for n, a in alpha.items() if a != a0},
    }


def _tidy(x: float) -> float | int:
    """Round float noise away (alpha = scaling · r recomputed) and keep integral values integral."""
    y = float(f"{x:.9g}")
    return int(y) if y.is_integer() else y


def conform(adapter: Adapter, spec: LoraSpec, expected: set[str] | None) -> Adapter:
    """``adapter`` at rank ``spec.r`` and ``spec``'s scaling: truncated if larger, rescaled (ΔW kept).

    Raises :class:`AdapterError` if its rank is below ``spec.r`` or (with ``expected``) its modules differ.
    """
    if expected is not None:
        check_same_modules(set(adapter.modules), expected, "the package")
    if adapter.r < spec.r or min(adapter.ranks) < spec.r:
        raise AdapterError(f"the adapter has rank {min(adapter.ranks)}, below the requested rank {spec.r}")
    if adapter.r > spec.r or len(adapter.ranks) > 1:
        adapter = truncate(adapter, spec.r)
    out = rescale(adapter, spec.lora_alpha, use_rslora=spec.use_rslora)
    out.config.update(peft_config(list(spec.target_modules), spec.r, spec.lora_alpha, use_rslora=spec.use_rslora,
                                  base_model=adapter.config.get("base_model_name_or_path")))
    return out


def check_same_modules(got: set[str], want: set[str], where: str) -> None:
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        detail = "; ".join(s for s in (f"missing {missing[:3]}" if missing else "",
                                       f"unexpected {extra[:3]}" if extra else "") if s)
        raise AdapterError(f"the adapter's modules do not match {where} ({detail})")
