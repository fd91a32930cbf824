"""The commands of a new user's first hour: --version and -h, `data`, `package inspect|verify`, `cache list|remove`."""

import json
import os
import subprocess
import sys

import pytest
from export_helpers import fake_package

from lorafleet.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def _cli(capsys, *args):
    """``(exit code, stdout, stderr)`` of the CLI run in this process."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("lorafleet: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_version():
    from lorafleet import __version__

    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lorafleet {__version__}"


def test_h_is_help_on_the_app_subcommands_and_groups():
    for args in ([], ["data"], ["package"], ["package", "verify"], ["cache", "remove"], ["train"]):
        proc = _run(*args, "-h")
        assert proc.returncode == 0, (args, proc.stderr[-300:])
        text = " ".join(proc.stdout.split())
        assert f"Usage: lorafleet {' '.join(args)}".strip() in text, args
        if args and args != ["package"]:  # every command shows examples (tests/test_cli_help.py checks them all)
            assert "Examples: lorafleet " in text, args


# --- data -----------------------------------------------------------------------------------------------

def test_data_is_read_back_by_read_jsonl(tmp_path, capsys):
    from lorafleet import tasks
    from lorafleet.edge_client.data import read_jsonl

    out = tmp_path / "data.jsonl"
    code, stdout, err = _cli(capsys, "data", "--out", str(out), "--examples", "3", "--seed", "7")
    assert code == 0, err
    seen = tasks.families("seen")
    assert f"wrote {3 * len(seen)} examples" in stdout
    dataset = read_jsonl(out)
    assert dataset.skipped == 0 and len(dataset.examples) == 3 * len(seen)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["family"] for r in rows[:len(seen)]] == seen  # the families take turns
    assert dataset.examples[0] == tasks.generate(seen[0], 1, seed=7)[0]  # the task suite's own examples

    again = tmp_path / "again.jsonl"
    assert _cli(capsys, "data", "--out", str(again), "--examples", "3", "--seed", "7")[0] == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic


def test_data_split_and_families(tmp_path, capsys):
    from lorafleet import tasks
    from lorafleet.edge_client.data import read_jsonl

    held = tasks.families("heldout")[:2]
    out = tmp_path / "sub" / "held.jsonl"
    code, _, err = _cli(capsys, "data", "--out", str(out), "--split", "heldout", "--families", ",".join(held),
                        "--examples", "2")
    assert code == 0, err
    assert sorted({json.loads(line)["family"] for line in out.read_text().splitlines()}) == sorted(held)
    assert len(read_jsonl(out).examples) == 4

    seen = tasks.families("seen")[0]
    code, _, err = _cli(capsys, "data", "--out", str(tmp_path / "x.jsonl"), "--split", "heldout", "--families", seen)
    _one_line_error(code, err, f"{seen!r} is a seen family")
    code, _, err = _cli(capsys, "data", "--out", str(tmp_path / "x.jsonl"), "--families", "no_such_task")
    _one_line_error(code, err, "unknown task family 'no_such_task'")
    code, _, err = _cli(capsys, "data", "--out", str(tmp_path / "x.jsonl"), "--split", "train")
    _one_line_error(code, err, "--split must be one of seen, heldout, all")
    code, _, err = _cli(capsys, "data", "--out", str(tmp_path / "x.jsonl"), "--examples", "0")
    _one_line_error(code, err, "--examples must be a positive integer")
    assert not (tmp_path / "x.jsonl").exists()


def test_data_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "data.jsonl"
    out.write_text("mine\n")
    code, _, err = _cli(capsys, "data", "--out", str(out))
    _one_line_error(code, err, "already exists")
    assert out.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temporary file left


# --- package inspect / verify ---------------------------------------------------------------------------

@pytest.fixture
def pkg(tmp_path):
    return fake_package(tmp_path / "pkg", ranks=(2, 4))


def test_package_inspect(pkg, capsys):
    code, out, err = _cli(capsys, "package", "inspect", str(pkg), "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["model"]["spec"] == "random:tiny" and s["target_modules"] == ["q_proj", "v_proj"]
    assert s["runtimes"] == ["executorch", "onnx"] and (s["seq_len"], s["batch_size"]) == (8, 1)
    assert [r["r"] for r in s["ranks"]] == [2, 4]
    assert s["ranks"][1]["training_peak_memory_bytes"] == 4000 and s["ranks"][1]["flops_per_step"] == 8000
    assert s["ranks"][0]["size_bytes"] > 0 and set(s["ranks"][0]["artifacts"]) == {
        "executorch_inference", "executorch_training", "onnx_training", "adapter"}
    assert s["verification"] == {"passed": True, "checks": 0, "failed": 0, "worst": {}}
    assert s["size_bytes"] == sum(r["size_bytes"] for r in s["ranks"]) + sum(s["shared_files"].values())

    code, out, err = _cli(capsys, "package", "inspect", str(pkg))
    assert code == 0, err
    text = " ".join(out.split())
    assert "random:tiny" in text and "q_proj,v_proj" in text and "executorch,onnx" in text
    assert "verification against eager PEFT: passed" in text


def test_package_inspect_summarizes_checks():
    from lorafleet.commands.package import _verification

    checks = [{"rank": 4, "artifact": "onnx_training", "metric": "loss_abs_diff", "value": v, "limit": 1e-4,
               "passed": True} for v in (1e-6, 3e-5)]
    assert _verification({"passed": True, "checks": checks}) == {
        "passed": True, "checks": 2, "failed": 0, "worst": {"loss_abs_diff": {"value": 3e-5, "limit": 1e-4}}}
    assert _verification({"checks": "?"}) == {"passed": False, "checks": 0, "failed": 0, "worst": {}}  # free-form


def test_package_verify_ok_and_tampered(pkg, capsys):
    code, out, err = _cli(capsys, "package", "verify", str(pkg))
    assert code == 0, err
    assert out.startswith(f"OK: {pkg}: ")

    with open(pkg / "onnx" / "rank-4" / "checkpoint", "r+b") as f:  # same size, other bytes
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    code, out, err = _cli(capsys, "package", "verify", str(pkg))
    _one_line_error(code, err, "onnx/rank-4/checkpoint is corrupt")
    assert "OK" not in out


def test_package_commands_on_a_non_package(tmp_path, capsys):
    for command in ("inspect", "verify"):
        code, _, err = _cli(capsys, "package", command, str(tmp_path))
        _one_line_error(code, err, "is not an edge package")


def test_package_inspect_rejects_an_edited_manifest(pkg, capsys):
    m = pkg / "manifest.json"
    m.write_text(m.read_text().replace('"seq_len": 8', '"seq_len": 9'))
    code, _, err = _cli(capsys, "package", "inspect", str(pkg))
    _one_line_error(code, err, "was edited after export")


# --- cache ----------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAFLEET_CACHE", str(root))
    fake_package(root / "packages" / "tiny-0123abcd")
    (root / "packages" / "tiny-0123abcd.export.log").write_text("exported\n")
    (root / "models" / "smollm2-135m").mkdir(parents=True)
    (root / "models" / "smollm2-135m" / "model.gguf").write_bytes(b"\0" * 1000)
    (root / "ranks").mkdir()
    (root / "ranks" / "abc.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"x" * 5000)
    os.symlink(outside, root / "models" / "linked")
    os.symlink(outside / "precious.bin", root / "models" / "smollm2-135m" / "link.bin")
    return root


def _listing(capsys):
    code, out, err = _cli(capsys, "cache", "list", "--json")
    assert code == 0, err
    return json.loads(out)


def test_cache_list(cache, capsys):
    listing = _listing(capsys)
    assert listing["cache"] == str(cache)
    kinds = {e["key"]: e["kind"] for e in listing["entries"]}
    assert kinds == {"tiny-0123abcd": "package", "smollm2-135m": "model", "linked": "other", "ranks": "other"}
    sizes = {e["key"]: e["size_bytes"] for e in listing["entries"]}
    pkg_bytes = sum(p.stat().st_size for p in (cache / "packages").rglob("*") if p.is_file())
    assert sizes["tiny-0123abcd"] == pkg_bytes  # the export log counts with its package
    assert 1000 < sizes["smollm2-135m"] < 2000 and sizes["linked"] < 1000  # links are not followed
    assert listing["size_bytes"] == sum(sizes.values())

    code, out, err = _cli(capsys, "cache", "list")
    assert code == 0, err
    assert "tiny-0123abcd" in out and "package" in out and "4 entries" in " ".join(out.split())


def test_cache_remove_one_and_all(cache, tmp_path, capsys):
    code, out, err = _cli(capsys, "cache", "remove", "tiny-0123abcd")
    assert code == 0, err
    assert "removed package tiny-0123abcd" in out
    assert list((cache / "packages").iterdir()) == []  # its log went with it

    code, _, err = _cli(capsys, "cache", "remove", "linked")
    assert code == 0, err
    assert not (cache / "models" / "linked").exists() and (tmp_path / "outside" / "precious.bin").is_file()

    code, out, err = _cli(capsys, "cache", "remove", "--all")
    assert code == 0, err
    assert "removed 2 entries" in out
    assert list(cache.iterdir()) == []
    assert (tmp_path / "outside" / "precious.bin").read_bytes() == b"x" * 5000  # never followed out
    assert _listing(capsys)["entries"] == []


@pytest.mark.parametrize("key", ["../outside", "models/linked", "..", ".", "a\\b"])
def test_cache_remove_refuses_paths(cache, capsys, key):
    code, _, err = _cli(capsys, "cache", "remove", key)
    _one_line_error(code, err, "bad cache key")
    assert len(_listing(capsys)["entries"]) == 4


def test_cache_remove_needs_one_key_or_all(cache, capsys):
    _one_line_error(*_cli(capsys, "cache", "remove")[::2], "give a KEY")
    _one_line_error(*_cli(capsys, "cache", "remove", "ranks", "--all")[::2], "not both")
    _one_line_error(*_cli(capsys, "cache", "remove", "no-such-entry")[::2], "no cache entry 'no-such-entry'")
    assert len(_listing(capsys)["entries"]) == 4
