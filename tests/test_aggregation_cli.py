"""`lorafleet aggregate` / `lorafleet distribute` on PEFT directories: results equal the in-memory library,
and every bad input gives one line, a non-zero exit, no OUT left behind and untouched inputs."""

import json
import math

import pytest
import torch
from agg_helpers import deltas, make_adapter, max_rel_err, rel_err, tree_digest, write_raw

from lorafleet.cli import main
from lorafleet.export.formats.adapter import read_adapter, write_adapter
from lorafleet.server.aggregation import aggregate, aggregate_dirs

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def clients(tmp_path):
    """Three client directories: ranks 2, 6 and 4, alphas 16, 8 and 3 (one rsLoRA-free mix)."""
    dirs = []
    for i, (r, alpha) in enumerate([(2, 16), (6, 8), (4, 3)]):
        dirs.append(write_adapter(make_adapter(r, alpha, seed=i), tmp_path / f"c{i}"))
    return dirs


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("method", "opts"), [("hetlora", {"use_weights": True}), ("flexlora", {})])
def test_aggregate_writes_what_the_library_computes(tmp_path, capsys, clients, method, opts):
    code, out, err = run_cli(capsys, "aggregate", "--method", method, "--weights", "3,1,2", "--out",
                             tmp_path / "g", *clients)
    assert code == 0, err
    assert f"wrote {tmp_path / 'g'}: {method} of 3 adapters, 2 modules, rank 6" in out
    ref = aggregate(method, [read_adapter(d) for d in clients], [3, 1, 2], **opts)
    assert max_rel_err(read_adapter(tmp_path / "g"), deltas(ref)) < 1e-6


def test_streamed_equals_in_memory(clients):
    for method in ("hetlora", "flexlora"):
        a = aggregate_dirs(method, clients, [1, 2, 3])
        b = aggregate(method, [read_adapter(d) for d in clients], [1, 2, 3])
        for name, p in a.modules.items():
            torch.testing.assert_close(p.lora_A, b.modules[name].lora_A)
            torch.testing.assert_close(p.lora_B, b.modules[name].lora_B)


def test_fedavg_and_equal_weights(tmp_path, capsys):
    dirs = [write_adapter(make_adapter(4, a, seed=i), tmp_path / f"c{i}") for i, a in enumerate([16, 16, 8])]
    assert run_cli(capsys, "aggregate", "--method", "fedavg", "--out", tmp_path / "g", *dirs)[0] == 0
    ref = aggregate("fedavg", [read_adapter(d) for d in dirs])
    assert max_rel_err(read_adapter(tmp_path / "g"), deltas(ref)) < 1e-6


def test_distribute_writes_the_leading_components(tmp_path, capsys, clients):
    run_cli(capsys, "aggregate", "--method", "flexlora", "--out", tmp_path / "g", *clients)
    code, out, _ = run_cli(capsys, "distribute", "--rank", 3, "--out", tmp_path / "d3", tmp_path / "g")
    assert code == 0 and "rank 3" in out
    glob, cut = read_adapter(tmp_path / "g"), read_adapter(tmp_path / "d3")
    assert cut.ranks == {3}
    for name, p in glob.modules.items():
        want = p.scaling * p.lora_B[:, :3] @ p.lora_A[:3]
        assert rel_err(deltas(cut)[name], want) < 1e-6


# --- bad input ---------------------------------------------------------------------------------------------

def _nan_client(tmp_path, value):
    a = make_adapter(4, 16, seed=9)
    a.modules[Q].lora_B[0, 0] = value  # modules are read in sorted order: q_proj is second, mid-stream
    return write_adapter(a, tmp_path / "bad")


def _pickle_only(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    return d


def _truncated(tmp_path):
    d = write_adapter(make_adapter(4, 16, seed=9), tmp_path / "bad")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return d


def _garbage(tmp_path):
    d = write_adapter(make_adapter(4, 16, seed=9), tmp_path / "bad")
    (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}\x00\x00")
    return d


def _other_modules(tmp_path):
    return write_adapter(make_adapter(4, shapes={Q: (24, 20), "model.layers.0.self_attn.k_proj": (8, 20)}),
                         tmp_path / "bad")


def _other_shapes(tmp_path):
    return write_adapter(make_adapter(4, shapes={Q: (24, 20), "model.layers.0.mlp.down_proj": (18, 30)}),
                         tmp_path / "bad")


def _rank_too_large(tmp_path):
    tensors = {f"base_model.model.{Q}.lora_A.weight": torch.ones(21, 20),
               f"base_model.model.{Q}.lora_B.weight": torch.ones(24, 21)}
    return write_raw(tmp_path / "bad", tensors, {"peft_type": "LORA", "r": 21, "lora_alpha": 8})


BAD_CLIENTS = {
    "nan": (lambda p: _nan_client(p, math.nan), f"module {Q} has NaN or Inf values"),
    "inf": (lambda p: _nan_client(p, -math.inf), f"module {Q} has NaN or Inf values"),
    "pickle": (_pickle_only, "holds only a pickle (adapter_model.bin); lorafleet never unpickles"),
    "truncated": (_truncated, "corrupt or truncated safetensors file"),
    "garbage": (_garbage, "corrupt or truncated safetensors file"),
    "modules": (_other_modules, "adapts different modules than"),
    "shapes": (_other_shapes, "adapts a 18x30 base weight"),
    "rank": (_rank_too_large, "has rank 21, larger than min(out, in) = 20"),
    "missing": (lambda p: p / "nowhere", "adapter directory not found"),
}


def _assert_clean_failure(tmp_path, inputs, digests, code, err, match):
    assert code != 0
    line = err.strip()
    assert line.startswith("lorafleet: error: ") and "\n" not in line, err
    assert match in line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind
    assert [tree_digest(d) if d.exists() else None for d in inputs] == digests


@pytest.mark.parametrize("case", sorted(BAD_CLIENTS))
def test_bad_client_is_refused_cleanly(tmp_path, capsys, clients, case):
    make, match = BAD_CLIENTS[case]
    inputs = [*clients, make(tmp_path)]
    digests = [tree_digest(d) if d.exists() else None for d in inputs]
    code, _, err = run_cli(capsys, "aggregate", "--method", "flexlora", "--out", tmp_path / "out", *inputs)
    _assert_clean_failure(tmp_path, inputs, digests, code, err, match)


@pytest.mark.parametrize(("args", "match"), [
    (["--method", "flexlora", "--weights", "1,0,2"], "weight 2 must be a positive finite number, got 0.0"),
    (["--method", "flexlora", "--weights", "1,-2,2"], "weight 2 must be a positive finite number, got -2.0"),
    (["--method", "hetlora", "--weights", "1,nan,2"], "weight 2 must be a positive finite number, got nan"),
    (["--method", "flexlora", "--weights", "inf,1,2"], "weight 1 must be a positive finite number, got inf"),
    (["--method", "flexlora", "--weights", "1,2"], "got 2 weights for 3 client adapters"),
    (["--method", "flexlora", "--weights", "1,two,3"], "--weights: 'two' is not a number"),
    (["--method", "fedavg"], "fedavg needs equal ranks"),
    (["--method", "flexlora", "--rank", "19"], "rank 19 exceeds min(out, in) = 18"),
    (["--method", "hetlora", "--rank", "5"], "hetlora keeps the global adapter at the largest client rank 6"),
])
def test_bad_arguments_are_refused_cleanly(tmp_path, capsys, clients, args, match):
    digests = [tree_digest(d) for d in clients]
    code, _, err = run_cli(capsys, "aggregate", *args, "--out", tmp_path / "out", *clients)
    _assert_clean_failure(tmp_path, clients, digests, code, err, match)


def test_existing_out_is_left_alone(tmp_path, capsys, clients):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "aggregate", "--method", "flexlora", "--out", tmp_path / "out", *clients)
    assert code == 1 and "already exists" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_unknown_method_is_a_usage_error(tmp_path, capsys, clients):
    code, _, err = run_cli(capsys, "aggregate", "--method", "fedprox", "--out", tmp_path / "out", *clients)
    assert code == 2 and "fedprox" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rank", "match"), [(7, "cannot truncate a rank-6 adapter to rank 7"),
                                             (0, "rank must be positive, got 0")])
def test_distribute_bad_rank(tmp_path, capsys, clients, rank, match):
    run_cli(capsys, "aggregate", "--method", "hetlora", "--out", tmp_path / "g", *clients)
    digest = tree_digest(tmp_path / "g")
    code, _, err = run_cli(capsys, "distribute", "--rank", rank, "--out", tmp_path / "out", tmp_path / "g")
    _assert_clean_failure(tmp_path, [tmp_path / "g"], [digest], code, err, match)


def test_streaming_reads_each_module_once_after_checking_every_header(tmp_path, clients, monkeypatch):
    from lorafleet.server.aggregation.streaming import LazyAdapter

    reads = []
    original = LazyAdapter.pair

    def spy(self, module):
        reads.append((self.path.name, module))
        return original(self, module)

    monkeypatch.setattr(LazyAdapter, "pair", spy)
    aggregate_dirs("flexlora", clients)
    modules = sorted(read_adapter(clients[0]).modules)
    assert reads == [(d.name, m) for m in modules for d in clients]  # module-major: one module in memory

    reads.clear()
    bad = write_adapter(make_adapter(4, shapes={Q: (24, 20), "model.layers.0.mlp.down_proj": (18, 30)}),
                        tmp_path / "bad")
    with pytest.raises(Exception, match="adapts a 18x30 base weight"):
        aggregate_dirs("flexlora", [*clients, bad])
    assert reads == []  # refused from the headers, before any tensor value was read
