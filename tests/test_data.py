"""Instruction data: field mapping, errors with line numbers, the chat format, response-only labels, batches."""

import json

import numpy as np
import pytest

from lorafleet.edge_client.data import (
    IGNORE_INDEX,
    Example,
    batches,
    chat_messages,
    encode_all,
    encode_example,
    parse_record,
    prompt_text,
    read_jsonl,
)
from lorafleet.export.compiler.tokenizer import byte_tokenizer
from lorafleet.export.formats.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "Add", "input": "2+2", "output": "4"}, Example("Add", "2+2", "4")),          # Alpaca
    ({"instruction": "Add", "output": "4"}, Example("Add", "", "4")),                            # no input
    ({"instruction": "Sum", "context": "1,2", "response": "3", "category": "qa"}, Example("Sum", "1,2", "3")),  # Dolly
    ({"definition": "Negate", "inputs": "yes", "targets": "no", "task_name": "t1"}, Example("Negate", "yes", "no")),
    ({"Definition": ["Negate"], "Input": "yes", "Output": ["no", "nope"]}, Example("Negate", "yes", "no")),
    ({"instruction": "Q", "input": None, "output": "A"}, Example("Q", "", "A")),
])
def test_field_mapping(record, expected):
    assert parse_record(record) == expected


@pytest.mark.parametrize("line, match", [
    ("{not json", r"line 2: not valid JSON \(Expecting property name"),
    ("[1, 2]", r"line 2: expected a JSON object, got list"),
    ({"input": "x", "output": "y"}, r"line 2: no instruction field \(expected one of instruction, definition"),
    ({"instruction": "x"}, r"line 2: no output field \(expected one of output, response, targets"),
    ({"instruction": "x", "output": 3}, r"line 2: field 'output' must be a string, got 3"),
    ({"instruction": "  ", "output": "y"}, r"line 2: the instruction is empty"),
    ({"instruction": "x", "output": ""}, r"line 2: the output is empty"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, match):
    p = _write(tmp_path, [{"instruction": "ok", "output": "fine"}, line])
    with pytest.raises(DataError, match="d.jsonl " + match):
        read_jsonl(p)
    ds = read_jsonl(p, skip_invalid=True)
    assert ds.skipped == 1 and ds.skipped_lines == [2] and len(ds.examples) == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "none.jsonl")
    empty = _write(tmp_path, [""], "e.jsonl")
    with pytest.raises(DataError, match=r"e.jsonl holds no examples$"):
        read_jsonl(empty)
    bad = _write(tmp_path, ["{", "{"], "b.jsonl")
    with pytest.raises(DataError, match=r"b.jsonl holds no examples \(2 invalid lines skipped\)"):
        read_jsonl(bad, skip_invalid=True)
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_jsonl(binary)


def test_blank_lines_are_ignored(tmp_path):
    p = _write(tmp_path, [{"instruction": "a", "output": "b"}, "", "  ", {"instruction": "c", "output": "d"}])
    assert [e.output for e in read_jsonl(p).examples] == ["b", "d"]


def test_chat_messages():
    assert chat_messages(Example("Translate", "chat", "cat")) == [
        {"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]
    assert chat_messages(Example("Say hi", "", "hi"))[0]["content"] == "Say hi"


def test_loss_is_on_the_response_only(tok):
    ex = Example("Say hi", "", "hello")
    ids, labels = encode_example(tok, ex, 256)
    assert len(ids) == len(labels) == 256
    prompt = prompt_text(tok, ex)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    response = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert response == "hello<|im_end|>\n"
    assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt])
    assert tok.decode(ids[:n_prompt]) == prompt
    n_real = n_prompt + len("hello") + 2  # "hello", <|im_end|>, "\n"
    assert ids[n_prompt:n_real] == labels[n_prompt:n_real]
    assert ids[n_real:] == [tok.pad_token_id] * (256 - n_real)
    assert labels[n_real:] == [IGNORE_INDEX] * (256 - n_real)


def test_long_examples_keep_the_end_of_the_prompt_and_half_the_window_for_the_response(tok):
    ex = Example("x" * 500, "y" * 100, "z" * 500)
    ids, labels = encode_example(tok, ex, 64)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert len(kept) == 32 and tok.decode(kept) == "z" * 32
    assert tok.decode(ids[:32]).endswith("y<|im_end|>\n<|im_start|>assistant\n")
    short = Example("x" * 500, "", "ok")
    ids, labels = encode_example(tok, short, 64)
    assert sum(t != IGNORE_INDEX for t in labels) == len("ok") + 2  # "ok", <|im_end|>, "\n"
    assert IGNORE_INDEX not in labels[-4:] and tok.decode(ids[-4:]) == "ok<|im_end|>\n"
    with pytest.raises(ConfigError, match="seq_len must be at least 2, got 1"):
        encode_example(tok, short, 1)


def test_batches_are_seeded_full_and_cover_every_example(tok):
    exs = [Example(f"q{i}", "", f"a{i}") for i in range(5)]
    enc = encode_all(tok, exs, 128)
    first = list(batches(enc, 2, 5, seed=3))
    again = list(batches(enc, 2, 5, seed=3))
    other = list(batches(enc, 2, 5, seed=4))
    assert all(b.input_ids.shape == (2, 128) and b.input_ids.dtype == np.int64 for b in first)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(first, other, strict=True))
    rows = {tuple(r) for b in first[:3] for r in b.input_ids[:, :]}  # the first epoch (5 of 6 rows)
    assert len(rows) == 5
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        list(batches(enc, 0, 1, seed=0))
    with pytest.raises(DataError, match="no examples"):
        list(batches([], 1, 1, seed=0))


def test_tokenizer_for_a_model_spec(tmp_path, monkeypatch):
    from lorafleet.edge_client.tokenizer import load_tokenizer
    from lorafleet.export.formats.errors import ModelSpecError

    assert load_tokenizer("random:tiny").chat_template
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelSpecError, match="no usable tokenizer for model"):
        load_tokenizer(str(tmp_path))
