"""Instruction data and the ONE prompt format of lorafleet (training, evaluation and the fleet all use it).

Data is JSONL, one example per line, with ``instruction`` / ``input`` / ``output``. The field names of the
usual instruction sets are mapped: Alpaca (``instruction``, ``input``, ``output``), Dolly
(``instruction``, ``context``, ``response``), Natural-Instructions (``definition``, ``inputs``,
``targets``; a list of targets takes its first) and TRL's prompt-completion (``prompt``, ``completion``).
TRL's conversational format is read too: ``{"messages": [{"role": "user", "content": ...}, {"role":
"assistant", "content": ...}, ...]}`` (roles ``system``, ``user``, ``assistant``; the last turn the
assistant's). A malformed line is an error naming the file and line, or, with ``skip_invalid=True``, is
skipped and counted.

Formatting: the example becomes a chat (:func:`chat_messages`) rendered by the tokenizer's chat template; the
loss is on the assistant turns only (:func:`encode_example`). Sequences are fixed-length, padded on the right
with labels ``-100``, which is what the packaged programs take (``docs/package-format.md``: labels unshifted,
the program shifts them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.export.formats.errors import ConfigError, DataError
from lorafleet.export.formats.program import IGNORE_INDEX  # labels the loss skips

# canonical field -> accepted names, first match wins (Alpaca, Dolly, Natural-Instructions, capitalised NI)
CHAT_ROLES = ("system", "user", "assistant")
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "definition", "Definition", "prompt"),
    "input": ("input", "context", "inputs", "Input"),
    "output": ("output", "response", "targets", "Output", "completion"),
}


@dataclass(frozen=True)
class Example:
    """One instruction example. ``input`` may be empty. ``chat``: the whole conversation ``((role, content),
    ...)`` when it was given as ``messages`` (then ``instruction`` is its first user turn and ``output`` its last
    assistant turn)."""

    instruction: str
    input: str
    output: str
    chat: tuple[tuple[str, str], ...] = ()


@dataclass
class Dataset:
    """Examples read from a file, and the lines skipped with ``skip_invalid``."""

    examples: list[Example]
    skipped_lines: list[int] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


@dataclass(frozen=True)
class Batch:
    """A training batch in the packaged programs' fixed shape. Both arrays are int64 ``(B, seq_len)``."""

    input_ids: Any  # numpy int64 (B, S)
    labels: Any  # numpy int64 (B, S): token ids on response positions, -100 elsewhere


# --- reading --------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, *, skip_invalid: bool = False) -> Dataset:
    """Read instruction examples from JSONL. Raises :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    examples, skipped = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse_record(_json_line(line)))
        except DataError as exc:
            if not skip_invalid:
                raise DataError(f"{path} line {number}: {exc}") from None
            skipped.append(number)
    if not examples:
        detail = f" ({len(skipped)} invalid lines skipped)" if skipped else ""
        raise DataError(f"{path} holds no examples{detail}")
    return Dataset(examples, skipped)


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def parse_record(record: Any) -> Example:
    """Map one JSON object's fields (any supported naming, or ``messages``) to an :class:`Example`."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _parse_messages(record["messages"])
    values: dict[str, str] = {}
    for canonical, names in FIELD_ALIASES.items():
        name = next((n for n in names if n in record), None)
        if name is None:
            if canonical == "input":
                values[canonical] = ""
                continue
            raise DataError(f"no {canonical} field (expected one of {', '.join(names)})")
        values[canonical] = _text(record[name], name)
    if not values["instruction"].strip():
        raise DataError("the instruction is empty")
    if not values["output"].strip():
        raise DataError("the output is empty")
    return Example(values["instruction"], values["input"], values["output"])


def _parse_messages(messages: Any) -> Example:
    """TRL's conversational format: a list of ``{"role", "content"}`` turns ending with the assistant's."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or "role" not in turn:
            raise DataError(f"messages[{i}] must be an object with a role and a string content, got "
                            f"{json.dumps(turn)[:60]}")
        if turn["role"] not in CHAT_ROLES:
            raise DataError(f"messages[{i}] has role {turn['role']!r} (expected one of {', '.join(CHAT_ROLES)})")
        turns.append((str(turn["role"]), str(turn["content"])))
    users = [c for r, c in turns if r == "user"]
    if not users or turns[-1][0] != "assistant" or not turns[-1][1].strip():
        raise DataError("messages need a user turn and must end with a non-empty assistant turn")
    return Example(users[0], "", turns[-1][1], chat=tuple(turns))


def example_record(example: Example) -> dict[str, Any]:
    """The JSON object :func:`parse_record` reads back as ``example`` (``messages`` for a conversation)."""
    if example.chat:
        return {"messages": [{"role": r, "content": c} for r, c in example.chat]}
    return {"instruction": example.instruction, "input": example.input, "output": example.output}


def _text(value: Any, name: str) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]  # Natural-Instructions: "Definition" and "targets" are lists of strings
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {json.dumps(value)[:40]}")
    return value


# --- the prompt format ----------------------------------------------------------------------------------

def chat_messages(example: Example) -> list[dict[str, str]]:
    """The example as a chat: the user turn (instruction, then a blank line and the input if there is one)
    and the assistant turn (the output). ``chat_messages(ex)[:-1]`` is the prompt for generation."""
    if example.chat:
        return [{"role": r, "content": c} for r, c in example.chat]
    user = example.instruction + (f"\n\n{example.input}" if example.input else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]


def prompt_text(tokenizer: Any, example: Example) -> str:
    """The chat-template text a model continues to answer ``example`` (generation prompt included)."""
    return str(tokenizer.apply_chat_template(chat_messages(example)[:-1], tokenize=False,
                                             add_generation_prompt=True))


def encode_example(tokenizer: Any, example: Example, seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``, each ``seq_len`` long: the chat-template rendering of the example, loss on
    the assistant turns only (labels ``-100`` on everything else and on padding; labels are *unshifted*).

    The text is cut where each assistant turn starts and ends (:func:`chat_segments`) and every piece is
    tokenized separately, so the boundaries are exact. When the example is too long, the last assistant turn
    (the response) keeps up to ``seq_len // 2`` tokens (all of it if shorter) and what comes before it is cut
    from the left (its end, ``<|im_start|>assistant\\n``, always survives); then the response is cut on the
    right.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    pieces = [(list(tokenizer(text, add_special_tokens=False)["input_ids"]), loss)
              for text, loss in chat_segments(tokenizer, chat_messages(example))]
    p_ids = [t for ids, _ in pieces[:-1] for t in ids]
    p_labels = [t if loss else IGNORE_INDEX for ids, loss in pieces[:-1] for t in ids]
    r_ids = pieces[-1][0]
    keep_r = min(len(r_ids), max(seq_len - len(p_ids), seq_len // 2))
    cut = max(0, len(p_ids) - (seq_len - keep_r))
    p_ids, p_labels = p_ids[cut:], p_labels[cut:]
    r_ids = r_ids[:seq_len - len(p_ids)]
    pad = pad_id(tokenizer)
    n_pad = seq_len - len(p_ids) - len(r_ids)
    input_ids = p_ids + r_ids + [pad] * n_pad
    labels = p_labels + r_ids + [IGNORE_INDEX] * n_pad
    return input_ids, labels


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The chat-template text of ``messages`` as ``(text, is_assistant_turn)`` pieces, ending with the last
    assistant turn: each assistant turn is what the template adds after its generation prompt."""
    def render(turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt))

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the chat template does not render the prompt as a prefix of the conversation")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def pad_id(tokenizer: Any) -> int:
    """The padding id (the EOS id when the tokenizer has no pad token; its labels are -100 anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# --- batching -------------------------------------------------------------------------------------------

def encode_all(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> list[tuple[list[int], list[int]]]:
    return [encode_example(tokenizer, ex, seq_len) for ex in examples]


def batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, steps: int, seed: int) -> Iterator[Batch]:
    """``steps`` batches of exactly ``batch_size`` examples: seeded shuffled epochs, wrapping around.

    The order depends only on ``seed`` and the number of examples, so every backend sees the same batches.
    """
    import numpy as np

    if not encoded:
        raise DataError("no examples to train on")
    if batch_size < 1 or steps < 0:
        raise ConfigError(f"batch_size must be >= 1 and steps >= 0, got batch_size={batch_size}, steps={steps}")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.permutation(len(encoded)).tolist()
        take, order = order[:batch_size], order[batch_size:]
        ids = np.array([encoded[i][0] for i in take], dtype=np.int64)
        labels = np.array([encoded[i][1] for i in take], dtype=np.int64)
        yield Batch(ids, labels)
