"""The tokenizer of a package's foundation model, loaded without the model's weights.

Random-weight specs use lorafleet's byte tokenizer (:mod:`lorafleet.export.compiler.tokenizer`); the embedded model,
local Hugging Face directories and GGUF files carry their own tokenizer and chat template.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from lorafleet.export.formats.errors import ModelSpecError


@lru_cache(maxsize=4)
def load_tokenizer(spec: str) -> Any:
    """A ``transformers`` tokenizer with a chat template for model spec ``spec``."""
    from lorafleet.export.compiler.models import embedded_hf_dir, parse_spec

    ms = parse_spec(spec)
    if ms.kind == "random":
        from lorafleet.export.compiler.tokenizer import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        if ms.kind == "embedded":
            tok = AutoTokenizer.from_pretrained(str(embedded_hf_dir()))
        elif ms.kind == "gguf":
            assert ms.path is not None
            tok = AutoTokenizer.from_pretrained(str(ms.path.parent), gguf_file=ms.path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(ms.path))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSpecError(f"no usable tokenizer for model {spec!r}: {str(exc).splitlines()[0]}") from exc
    if not getattr(tok, "chat_template", None):
        raise ModelSpecError(f"the tokenizer of model {spec!r} has no chat template (lorafleet formats "
                             f"instruction data with it)")
    return tok
