"""train_local and `lorafleet train`: the result, the adapter it writes, self-pruning, one-line errors."""

import json
import shutil

import pytest
import torch
from client_helpers import EXAMPLES, nonzero_adapter, require_native, write_jsonl

from lorafleet.cli import main
from lorafleet.edge_client.self_prune import SelfPruneConfig
from lorafleet.edge_client.trainer import train_local
from lorafleet.export.formats.adapter import read_adapter
from lorafleet.export.formats.errors import AdapterError, ConfigError

TRAIN_KEYS = ["losses", "peak_rss_bytes", "step_seconds", "num_examples", "rank"]


@pytest.mark.parametrize("backend", ["onnxruntime", "executorch", "native"])
def test_train_local_on_a_compiled_backend(tiny_package, backend):
    if backend == "native":
        require_native()
    res = train_local(tiny_package, 4, backend, EXAMPLES, initial_adapter=nonzero_adapter(8), steps=4,
                      lr=1e-2, seed=0)
    assert len(res.losses) == 4 and res.rank == res.trained_rank == 4 and res.num_examples == 4
    assert res.peak_rss_bytes > (4 << 20 if backend == "native" else 50 << 20)  # no interpreter in native's
    assert res.step_seconds > 0 and res.prune is None
    assert list(res.to_json()) == TRAIN_KEYS
    start = nonzero_adapter(8)  # truncated to rank 4 on the way in: training starts from its first 4 components
    p0 = next(iter(start.modules.values()))
    p1 = next(iter(res.adapter.modules.values()))
    assert p1.lora_A.shape == (4, 64) and torch.allclose(p1.lora_A, p0.lora_A[:4], atol=0.1)


def test_self_pruning_shrinks_to_a_packaged_rank(tiny_package):
    strong = SelfPruneConfig(gamma=0.5, lam=50.0)  # tail = components 4..7, pushed hard towards zero
    res = train_local(tiny_package, 8, "torch", EXAMPLES, initial_adapter=nonzero_adapter(8), steps=3, lr=1e-2,
                      seed=0, self_prune=strong)
    assert res.trained_rank == 8 and res.rank == 4 and res.adapter.r == 4
    assert res.prune is not None and res.prune.tail_norm_trained < res.prune.tail_norm_received


def test_train_local_errors(tiny_package):
    with pytest.raises(ConfigError, match=r"onnxruntime programs take batch size 1, got --batch-size 2"):
        train_local(tiny_package, 4, "onnxruntime", EXAMPLES, steps=1, batch_size=2)
    with pytest.raises(ConfigError, match="steps must be at least 1, got 0"):
        train_local(tiny_package, 4, "torch", EXAMPLES, steps=0)
    with pytest.raises(ConfigError, match="unknown backend 'tflite'"):
        train_local(tiny_package, 4, "tflite", EXAMPLES, steps=1)
    with pytest.raises(AdapterError, match="the adapter has rank 2, below the requested rank 4"):
        train_local(tiny_package, 4, "torch", EXAMPLES, steps=1, initial_adapter=nonzero_adapter(2))
    with pytest.raises(ConfigError, match=r"training diverged at step \d \(loss nan\)"):
        train_local(tiny_package, 2, "torch", EXAMPLES, steps=3, initial_adapter=nonzero_adapter(2, scale=1e30))


def test_torch_backend_takes_any_batch_size(tiny_package):
    res = train_local(tiny_package, 2, "torch", EXAMPLES, steps=2, batch_size=3, seed=1)
    assert len(res.losses) == 2 and res.adapter.r == 2


def _train_args(pkg, data, out, *extra):
    return ["train", "--package", str(pkg), "--rank", "4", "--backend", "onnxruntime", "--data", str(data),
            "--steps", "3", "--seed", "0", "--out", str(out), *extra]


def test_cli_train_json_and_a_peft_loadable_adapter(tiny_package, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", extra_lines=("not json",))
    assert main(_train_args(tiny_package, data, tmp_path / "a", "--json", "--skip-invalid", "--lr", "1e-2")) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert list(out) == TRAIN_KEYS and len(out["losses"]) == 3 and out["rank"] == 4 and out["num_examples"] == 4
    assert "skipped 1 malformed lines" in captured.err
    adapter = read_adapter(tmp_path / "a")
    assert adapter.r == 4 and adapter.config["lora_alpha"] == 16.0
    from peft import PeftModel

    from lorafleet.export.compiler.models import load_model

    model = PeftModel.from_pretrained(load_model("random:tiny", with_tokenizer=False).model, str(tmp_path / "a"))
    assert model.peft_config["default"].r == 4


def test_cli_train_text_output_with_self_prune(tiny_package, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl")
    args = _train_args(tiny_package, data, tmp_path / "a", "--self-prune")
    args[args.index("onnxruntime")] = "torch"
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "trained rank 4 on torch: 3 steps" in text and "self-pruning:" in text and "written to" in text


@pytest.mark.parametrize("case, match", [
    ("missing_package", "is not an edge package"),
    ("corrupt_package", r"is corrupt \(sha256"),
    ("rank", r"the package has no rank 3 \(ranks: \[2, 4, 8\]\)"),
    ("bad_line", r"d.jsonl line 5: not valid JSON"),
    ("out_exists", "already exists"),
    ("small_adapter", "below the requested rank 4"),
])
def test_cli_train_bad_input_is_one_line(tiny_package, tmp_path, capsys, case, match):
    pkg, out = tiny_package, tmp_path / "a"
    data = write_jsonl(tmp_path / "d.jsonl", extra_lines=("{oops",) if case == "bad_line" else ())
    extra = []
    if case == "missing_package":
        pkg = tmp_path / "nothing"
    if case == "corrupt_package":
        pkg = tmp_path / "pkg"
        shutil.copytree(tiny_package, pkg)
        victim = next(p for p in sorted(pkg.rglob("*.safetensors")) if "rank-4" in str(p))
        corrupted = bytearray(victim.read_bytes())
        corrupted[-1] ^= 0xFF
        victim.write_bytes(bytes(corrupted))
    if case == "out_exists":
        out.mkdir()
    if case == "small_adapter":
        from lorafleet.export.formats.adapter import write_adapter

        write_adapter(nonzero_adapter(2), tmp_path / "small")
        extra = ["--adapter", str(tmp_path / "small")]
    args = _train_args(pkg, data, out, *extra)
    if case == "rank":
        args[args.index("--rank") + 1] = "3"
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lorafleet: error: ")
    assert __import__("re").search(match, err), err
    assert case == "out_exists" or not out.exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "executorch", "torch"])
def test_a_bf16_adapter_trains_on_every_backend(tiny_package, tmp_path, capsys, backend):
    from lorafleet.export.formats.adapter import Adapter, LoraPair, write_adapter

    start = nonzero_adapter(4)
    bf16 = Adapter({n: LoraPair(p.lora_A.bfloat16(), p.lora_B.bfloat16(), p.scaling) for n, p in start.modules.items()},
                   dict(start.config))
    adapter_dir = write_adapter(bf16, tmp_path / "bf16")
    data = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    args = _train_args(tiny_package, data, tmp_path / "out", "--adapter", str(adapter_dir))
    args[args.index("onnxruntime")] = backend
    code = main(args)
    assert code == 0, capsys.readouterr().err
    assert read_adapter(tmp_path / "out").r == 4
