"""TRL's conversational `messages` format: read, written back, encoded with the loss on every assistant turn and
nowhere else; a malformed record is one line naming the file and line."""

import json

import pytest
from export_helpers import fake_package

from lorafleet.cli import main
from lorafleet.edge_client.data import IGNORE_INDEX, Example, encode_example, example_record, parse_record, read_jsonl
from lorafleet.export.compiler.tokenizer import byte_tokenizer
from lorafleet.export.formats.errors import DataError

TURN = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello"}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "four"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "six"}]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_a_single_turn_chat_encodes_exactly_as_the_same_instruction(tok):
    chat = parse_record({"messages": TURN})
    assert (chat.instruction, chat.output) == ("Say hi", "hello")
    assert encode_example(tok, chat, 64) == encode_example(tok, Example("Say hi", "", "hello"), 64)
    assert encode_example(tok, chat, 8) == encode_example(tok, Example("Say hi", "", "hello"), 8)  # truncated too


def test_the_loss_is_on_every_assistant_turn_and_nothing_else(tok):
    ex = parse_record({"messages": CHAT})
    ids, labels = encode_example(tok, ex, 256)
    text = tok.decode(ids)
    for turn in CHAT:
        assert turn["content"] in text
    # the labelled tokens, run by run, are exactly the two assistant turns (with the template's end of turn)
    runs, run = [], []
    for t in labels:
        if t == IGNORE_INDEX:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            run.append(t)
    assert runs == ["four<|im_end|>\n", "six<|im_end|>\n"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids, strict=True))


def test_messages_are_written_back_as_messages(tmp_path):
    ex = parse_record({"messages": CHAT})
    assert parse_record(json.loads(json.dumps(example_record(ex)))) == ex
    plain = Example("Add", "2+2", "4")
    assert parse_record(example_record(plain)) == plain


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "user"}], r"messages\[0\] must be an object with a role and a string content"),
    ([{"role": "bot", "content": "x"}], r"messages\[0\] has role 'bot'"),
    ([{"role": "user", "content": "x"}], "must end with a non-empty assistant turn"),
    ([{"role": "assistant", "content": "x"}], "need a user turn"),
])
def test_malformed_messages(tmp_path, messages, match):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": TURN}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=f"d.jsonl line 2: .*{match}"):
        read_jsonl(path)


def test_train_names_the_bad_line_in_one_line(tmp_path, capsys):
    pkg = fake_package(tmp_path / "pkg", ranks=(2,))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": TURN}) + "\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    code = main(["train", "--package", str(pkg), "--rank", "2", "--backend", "torch", "--data", str(data),
                 "--steps", "1", "--seed", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "chat.jsonl line 2: messages[0]" in err, err
