"""The native trainer (edge_client/native: C++ on the ExecuTorch runtime, no Python) against the Python
ExecuTorch backend on the shared `random:tiny` package: per-step losses over 20 steps, the written adapter read
by PEFT, next-token logits of the inference program, and bad input refused in one line."""

from __future__ import annotations

import json
import re
import struct
import subprocess

import numpy as np
import pytest
import torch
from client_helpers import example_batches, nonzero_adapter, require_native, require_native_join

from lorafleet.edge_client.backends import OptimizerConfig, make_backend
from lorafleet.edge_client.backends.native_backend import write_batches
from lorafleet.export.formats.adapter import read_adapter, write_adapter
from lorafleet.export.formats.package import open_package

RANK, STEPS, LR = 4, 20, 1e-2


@pytest.fixture(scope="module")
def tool():
    return require_native()


@pytest.fixture(scope="module")
def pkg(tiny_package):
    return open_package(tiny_package)


@pytest.fixture(scope="module")
def tiny_batches(pkg):
    return example_batches(pkg, STEPS, seed=2)


def _run(tool, *args, check=True):
    proc = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_native_training_matches_the_executorch_backend_step_for_step(tool, pkg, tiny_batches, tmp_path):
    start = nonzero_adapter(RANK, lora_alpha=8.0)  # not the compiled alpha (16): the tool rescales it
    write_adapter(start, tmp_path / "start")
    write_batches(tmp_path / "batches.bin", tiny_batches)
    proc = _run(tool, "train", "--package", pkg.path, "--rank", RANK, "--adapter", tmp_path / "start",
                "--batches", tmp_path / "batches.bin", "--lr", LR, "--out", tmp_path / "trained")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    native = [line["loss"] for line in lines if "step" in line]
    assert lines[-1]["written"] == str(tmp_path / "trained") and lines[-1]["rank"] == RANK

    be = make_backend("executorch", pkg, RANK, OptimizerConfig(lr=LR))
    be.load_adapter(start)
    python = [be.step(b) for b in tiny_batches]
    assert len(native) == STEPS
    assert np.max(np.abs(np.array(native) - np.array(python))) <= 1e-5, (native, python)
    assert python[-1] < python[0] - 0.05  # it trained: the comparison is between moving losses

    # PEFT's own readers take the written adapter; its tensors are the Python backend's
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    config = LoraConfig.from_pretrained(str(tmp_path / "trained"))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (RANK, 16.0, {"q_proj", "v_proj"})
    weights = load_peft_weights(str(tmp_path / "trained"), device="cpu")
    want = be.adapter_state().state_dict()
    assert set(weights) == set(want)
    for key, value in want.items():
        assert torch.allclose(weights[key], value, atol=1e-5), key
    assert read_adapter(tmp_path / "trained").r == RANK


def test_native_inference_gives_the_programs_next_token_logits(tool, pkg, tmp_path):
    from lorafleet.export.runtime.executorch import load_inference

    adapter = nonzero_adapter(RANK, seed=5)
    write_adapter(adapter, tmp_path / "a")
    ids = [5, 17, 3, 40, 9]
    proc = _run(tool, "infer", "--package", pkg.path, "--rank", RANK, "--adapter", tmp_path / "a",
                "--ids", ",".join(map(str, ids)), "--logits", tmp_path / "logits.f32")
    native = np.fromfile(tmp_path / "logits.f32", dtype="<f4")

    program = load_inference(pkg.path_of(RANK, "executorch_inference"), pkg.foundation("executorch"))
    program.set_adapter(adapter)
    window = torch.zeros((1, pkg.manifest.seq_len), dtype=torch.long)
    window[0, :len(ids)] = torch.tensor(ids)
    python = program.logits(window)[0, len(ids) - 1].numpy()
    assert np.max(np.abs(native - python)) <= 1e-5
    assert json.loads(proc.stdout)["next_token"] == int(python.argmax())


def test_the_runtime_plans_and_holds_what_the_manifest_predicts(tool, pkg):
    """The manifest's ExecuTorch device-memory terms (read from the program at export) against the C++ runtime
    itself: its MethodMeta's planned buffers, and the anonymous memory it holds once the program is loaded and
    has run a step (planned buffers, XNNPACK's packed weights and workspace; the runtime's own allocations)."""
    info = json.loads(_run(tool, "info", "--package", pkg.path, "--rank", RANK).stdout)
    terms = pkg.manifest.rank(RANK).estimates.device_memory["executorch"]
    assert info["planned_bytes"] == terms["planned"]
    held = terms["planned"] + terms["packed"] + terms["workspace"]
    assert held <= info["rss_anon_bytes"] <= held + terms["runtime"]


def _corrupt_header(tmp_path):
    write_adapter(nonzero_adapter(RANK), tmp_path / "bad")
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 10**9) + weights.read_bytes()[8:])
    return ["--adapter", tmp_path / "bad"]


def _pickled(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    return ["--adapter", d]


def _wrong_rank(tmp_path):
    write_adapter(nonzero_adapter(2), tmp_path / "r2")
    return ["--adapter", tmp_path / "r2"]


def _bad_token(tmp_path):
    from lorafleet.edge_client.data import Batch

    ids = np.zeros((1, 16), dtype=np.int64)
    ids[0, 3] = 10**6
    write_batches(tmp_path / "bad.bin", [Batch(ids, ids.copy())])
    return ["--batches", tmp_path / "bad.bin"]


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["--adapter", p / "missing"], "no such adapter directory"),
    (_corrupt_header, "header length out of bounds"),
    (_pickled, "only safetensors are read"),
    (_wrong_rank, "does not match the program's"),
    (lambda p: ["--rank", 16], "has no ExecuTorch training program for rank 16"),
    (lambda p: ["--lr", "fast"], "--lr must be a number"),
    (lambda p: ["--lr", "0"], "lr must be a positive number"),
    (_bad_token, "token id 1000000 at position 3 is outside the vocabulary (272)"),
])
def test_bad_input_is_one_line_and_writes_nothing(tool, pkg, tiny_batches, tmp_path, make_args, message):
    write_batches(tmp_path / "batches.bin", tiny_batches[:2])
    args = ["train", "--package", pkg.path, "--rank", RANK, "--batches", tmp_path / "batches.bin",
            "--out", tmp_path / "out"]
    extra = make_args(tmp_path)
    for i in range(0, len(extra), 2):  # an option given here replaces the default one
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    proc = _run(tool, *args, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lorafleet-native")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_batches_of_another_shape_are_refused(tool, pkg, tmp_path):
    from lorafleet.edge_client.data import Batch

    ids = np.zeros((2, pkg.manifest.seq_len), dtype=np.int64)
    write_batches(tmp_path / "b.bin", [Batch(ids, ids)])
    proc = _run(tool, "train", "--package", pkg.path, "--rank", RANK, "--batches", tmp_path / "b.bin",
                "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and f"batches are 2 x {pkg.manifest.seq_len}, the program trains 1 x" in proc.stderr
    (tmp_path / "b.bin").write_bytes(b"LFTB" + bytes(30))
    proc = _run(tool, "train", "--package", pkg.path, "--rank", RANK, "--batches", tmp_path / "b.bin",
                "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "token-batch version 0" in proc.stderr


def test_an_existing_output_is_kept(tool, pkg, tiny_batches, tmp_path):
    write_batches(tmp_path / "batches.bin", tiny_batches[:1])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = _run(tool, "train", "--package", pkg.path, "--rank", RANK, "--batches", tmp_path / "batches.bin",
                "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "already exists and is not empty" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- a device without Python in a real federation ----------------------------------------------------------

@pytest.mark.slow
def test_a_native_device_trains_in_a_tls_federation_beside_python_devices(tiny_package, tmp_path):
    """`lorafleet serve` (TLS, SuperNode authentication, FlexLoRA, 2 rounds) with two `lorafleet client`
    devices and one `lorafleet-native join` device, on 127.0.0.1. The native device answers the rank query
    with rank 2, the Python devices' profiles give rank 4; every reply is validated, none is dropped, and the native
    device's update is aggregated in both rounds. A native device whose key the server does not know is refused."""
    from fed_helpers import Processes, lorafleet, process_env, profile_for_rank, read_state, wait_for, write_data

    from lorafleet.federation import free_port
    from lorafleet.federation.certs import write_node_key, write_tls

    tool = require_native_join()
    root = tmp_path
    tls = write_tls(root / "tls", ["127.0.0.1", "localhost"])
    (root / "authorized").mkdir()
    keys = []
    for name, fmt in (("py-0", "openssh"), ("py-1", "openssh"), ("native", "pkcs8")):
        private, public = write_node_key(root / "keys" / name, fmt)
        public.rename(root / "authorized" / public.name)
        keys.append(private)
    rogue, _ = write_node_key(root / "keys" / "rogue", "pkcs8")
    env = process_env(root / "cache")
    procs = Processes(root / "logs", env)
    port, state = free_port(), root / "state"
    address = f"127.0.0.1:{port}"
    data = [write_data(root / f"data-{i}.jsonl", 6, offset=i) for i in range(3)]
    subprocess.run(lorafleet("batches", "--package", str(tiny_package), "--data", str(data[2]), "--steps", "8",
                             "--seed", "0", "--out", str(root / "native.bin")), env=env, check=True,
                   capture_output=True)
    try:
        procs.start("serve", lorafleet(
            "serve", "--package", str(tiny_package), "--method", "flexlora", "--rounds", "2", "--min-clients", "3",
            "--round-timeout", "120", "--local-steps", "4", "--lr", "0.01", "--address", address,
            "--state", str(state), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--ssl-ca-certfile", str(tls.ca), "--authorized-keys", str(root / "authorized")))
        wait_for(lambda: "devices connect to" in procs.log("serve"), 90, "lorafleet serve to listen")
        for i in range(2):
            profile = profile_for_rank(root / f"profile-{i}.toml", tiny_package, 4, 120)
            procs.start(f"py-{i}", lorafleet("client", "--server", address, "--package", str(tiny_package),
                                             "--data", str(data[i]), "--profile", str(profile),
                                             "--root-certificates", str(tls.ca), "--auth-key", str(keys[i]),
                                             "--exit-on-finish"))
        native = procs.start("native", [tool, "join", "--server", address, "--package", str(tiny_package),
                                        "--rank", "2", "--batches", str(root / "native.bin"),
                                        "--num-examples", "6", "--root-certificates", str(tls.ca),
                                        "--auth-key", str(keys[2]), "--exit-on-finish"])
        stranger = procs.start("rogue", [tool, "join", "--server", address, "--package", str(tiny_package),
                                         "--rank", "2", "--batches", str(root / "native.bin"),
                                         "--root-certificates", str(tls.ca), "--auth-key", str(rogue)])
        assert stranger.wait(60) != 0, procs.log("rogue")[-2000:]  # Flower refuses an unknown key's activation
        assert re.search(r"activate-node: HTTP 4\d\d", procs.log("rogue")), procs.log("rogue")[-2000:]
        wait_for(lambda: (read_state(state) or {}).get("finished"), 420, "the run to finish")
        assert native.wait(60) == 0, procs.log("native")[-3000:]
    finally:
        procs.stop_all()
    final = read_state(state)
    node = re.search(r"as node (\d+) \(rank 2\)", procs.log("native"))
    assert node, procs.log("native")[-2000:]
    logs = {name: procs.log(name)[-1500:] for name in ("serve", "py-0", "py-1", "native")}
    for entry in final["history"]:
        assert entry["aggregated"] and not entry["dropped"], (entry, logs)
        assert len(entry["valid"]) == 3 and entry["valid"][node.group(1)] == {"num_examples": 6, "rank": 2}, logs
        # the Python devices' profiles make rank 4 fit by the link's budget arithmetic (a slow machine can
        # still push a device down to rank 2): what matters here is the native device's own rank
        assert entry["sent"][node.group(1)] == 2 and set(entry["sent"].values()) <= {2, 4}, entry
    log = procs.log("native")
    assert "rank query: answered rank 2" in log and "round 2: trained rank 2, 4 steps" in log


def test_node_key_in_pkcs8_and_batches_commands(tiny_package, tmp_path, capsys):
    from client_helpers import write_jsonl

    from lorafleet.cli import main

    assert main(["node-key", "--out", str(tmp_path / "k"), "--format", "pkcs8"]) == 0
    assert (tmp_path / "k").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert main(["node-key", "--out", str(tmp_path / "k2"), "--format", "der"]) == 1
    assert "--format must be one of openssh, pkcs8, got 'der'" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl")
    args = ["batches", "--package", str(tiny_package), "--data", str(data), "--steps", "3", "--seed", "1",
            "--out", str(tmp_path / "b.bin")]
    assert main(args) == 0
    raw = (tmp_path / "b.bin").read_bytes()
    assert raw[:4] == b"LFTB" and struct.unpack("<IIIQ", raw[4:24]) == (1, 1, 16, 3) and len(raw) == 24 + 3 * 2 * 16 * 8
    assert main(args) == 1 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "b.bin").read_bytes() == raw


def test_the_native_backend_reports_the_tools_own_error(tool, tiny_package, tmp_path):
    import shutil

    from lorafleet.edge_client.backends.native_backend import NativeBackend
    from lorafleet.export.formats.errors import PackageError

    shutil.copytree(tiny_package, tmp_path / "pkg")
    program = tmp_path / "pkg" / "executorch" / f"rank-{RANK}" / "training.pte"
    program.write_bytes(program.read_bytes()[:1000])  # cut short: not a program any more
    pkg = open_package(tmp_path / "pkg", verify=False)
    with pytest.raises(PackageError, match=r"could not load rank 4 .*lorafleet-native: error: loading the program"):
        NativeBackend(pkg, RANK, OptimizerConfig())
