"""The README's sections after the first hour, run one after another in one directory as a user following the
README does: the export section (its package `pkg` then serves the profile, train, inspect and federation
sections), a real TLS federation with SuperNode authentication (the server machine's and the Jetson's
blocks), the device dry run, the same with Flower's own commands, and Flower's simulation engine from Python.

substitutions() holds every change the suite makes to a block, each with its reason; the README says so next to
the blocks. A change whose text the README no longer has fails the test. The fleet sections run in
tests/test_readme.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from readme_helpers import REPO, readme_env, run_bash, section_blocks, substituted, user_folder

EXPORT = "Export an edge package"
FED = "Run a real federation"
INSPECT = "Inspect packages, write data, manage the cache"
NATIVE = "Train without Python (the native device)"
TINY = [("smollm2-135m", "random:tiny")]  # a small model: the real one's export takes ~20 minutes


def substitutions(port: int, flower_ports: tuple[int, int, int]) -> dict[tuple[str, str, int], list[tuple[str, str]]]:
    """(section, language, block index) -> its (as written, what the suite runs) changes."""
    link, gate, node = flower_ports
    loopback = [("0.0.0.0", "127.0.0.1")]  # the suite listens on loopback only
    return {
        (EXPORT, "bash", 0): TINY + [("--ranks 4,8,16,32", "--ranks 4,8")],  # scale: two ranks, not four
        (EXPORT, "bash", 2): TINY,  # block 1, the dry run of a 3B model, runs as written (it loads no weights)
        (INSPECT, "bash", 0): [("cache remove smollm2-135m", "cache remove --all")],  # the suite has no real model
        (NATIVE, "bash", 0): [("make native\n", "")],  # `make install` built it; the folder has no Makefile
        (FED, "bash", 0): [  # the package is the export section's; a one-round, one-device federation
            ("lorafleet export smollm2-135m --ranks 4,8,16 --target-modules q_proj,v_proj --out pkg\n", ""),
            ("--rounds 20 --min-clients 3", "--rounds 1 --min-clients 1"),
            ("0.0.0.0:9092", f"127.0.0.1:{port}"),
            ("--authorized-keys authorized/", "--authorized-keys authorized/ &")],  # the device runs beside it
        (FED, "bash", 1): [  # the device on the same machine, with the server's data and CA, leaving at the end
            ("server.example.org:9092", f"127.0.0.1:{port}"), ("my-data.jsonl", "data.jsonl"),
            ("--root-certificates ca.pem", "--root-certificates tls/ca.pem"),
            ("--auth-key keys/jetson-1", "--auth-key keys/jetson-1 --exit-on-finish")],
        (FED, "bash", 3): loopback + [("9092", str(gate)), ("9093", str(link)), ("9094", str(node)),
                                      ("server.example.org", "127.0.0.1"),
                                      ("rounds=20 min-clients=3", "rounds=1 min-clients=1")],
        (FED, "python", 0): [("rounds=5, min_clients=100", "rounds=1, min_clients=4"),  # scale: 4 devices
                             ("min_valid=50, fraction=0.1", "min_valid=2, fraction=1.0"),
                             ("num_supernodes=1000", "num_supernodes=4")],
    }


def native_section(work, env, block) -> None:
    """The native section's block with the tool `make install` built (build/ linked in like .venv); the two
    `train` commands of the block train the same batches, so their last losses agree."""
    from client_helpers import require_native

    tool = require_native()
    (work / "build" / "native").mkdir(parents=True)
    (work / "build" / "native" / "lorafleet-native").symlink_to(tool)
    proc = run_bash(block(NATIVE), work, env)
    out = proc.stdout + proc.stderr  # lorafleet's progress lines go to stderr
    python_last = re.findall(r"step 20/20: loss (\d+\.\d+)", out)
    native_last = [json.loads(x)["loss"] for x in out.splitlines() if x.startswith('{"step": 20,')]
    assert python_last and native_last and abs(float(python_last[0]) - native_last[0]) < 1e-3, out[-2000:]
    assert '"next_token"' in out and read_adapter_r(work / "adapter-app") == 8


def read_adapter_r(path) -> int:
    from lorafleet.export.formats.adapter import read_adapter

    return read_adapter(path).r


@pytest.mark.slow
def test_the_package_and_federation_sections_run_as_written(tmp_path):
    from lorafleet.export.formats.adapter import read_adapter
    from lorafleet.export.formats.package import open_package
    from lorafleet.federation import free_port

    work = user_folder(tmp_path / "work")
    env = readme_env(tmp_path)
    changes = substitutions(free_port(), (free_port(), free_port(), free_port()))
    used = set()

    def block(heading: str, lang: str = "bash", index: int = 0) -> str:
        key = (heading, lang, index)
        used.add(key)
        return substituted(section_blocks(heading, lang)[index], changes.get(key, []))

    # the first hour's data (the train section's data.jsonl)
    run_bash("lorafleet data --out data.jsonl --examples 8", work, env)
    out = run_bash(block(EXPORT, "bash", 0) + block(EXPORT, "bash", 2), work, env).stderr
    assert "rank 8: export ONNX Runtime training artifacts" in out, out[-2000:]
    dry = run_bash(block(EXPORT, "bash", 1), work, env).stdout
    assert "random:llama-3.2-3b (llama, 3.21 B parameters, 28 layers)" in dry and not (work / "pkg-3b").exists()
    assert open_package(work / "pkg").manifest.ranks == [4, 8]
    assert open_package(work / "pkg-int8").manifest.quantization
    code = block(EXPORT, "python") + "assert adapter.r == 8 and loss > 0\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    profile = run_bash(block("Profile a device"), work, env).stdout
    assert "selected" in profile and '"selected_rank"' in profile, profile[-2000:]
    assert "trained rank 8" in run_bash(block("Train locally"), work, env).stdout
    assert read_adapter(work / "adapter-r8").r == 8
    native_section(work, env, block)
    inspect = run_bash(block(INSPECT), work, env).stdout
    assert "OK:" in inspect and (work / "heldout.jsonl").is_file()

    # a real federation: the server machine's block with the Jetson's beside it, then the dry run
    fed = run_bash(block(FED, "bash", 0) + block(FED, "bash", 1) + "wait\n", work, env).stdout
    assert "lorafleet: round 1/1: rank " in fed and "lorafleet: the run is over" in fed, fed[-3000:]
    state = json.loads((work / "fed-state" / "state.json").read_text())
    assert state["finished"] and read_adapter(work / "fed-state" / "global").r in (4, 8)
    dry = run_bash(block(FED, "bash", 2), work, env).stdout
    assert re.search(r"rank \d", dry), dry[-2000:]

    # Flower's own commands, from the same folder with the repository's profiles/ copied in
    shutil.copytree(REPO / "profiles", work / "profiles")
    run_bash(block(FED, "bash", 3), work, env, timeout=900)
    flower_state = json.loads((work / "fed-flower" / "state.json").read_text())
    assert flower_state["finished"] and flower_state["method"] == "hetlora"

    # Flower's simulation engine: the data block, then the Python as written at four devices
    run_bash(block(FED, "bash", 4), work, env)
    assert len(list((work / "data").glob("*.jsonl"))) == 10
    proc = subprocess.run([sys.executable, "-c", block(FED, "python")], cwd=work, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim_state = json.loads((work / "sim-state" / "state.json").read_text())
    assert sim_state["finished"] and read_adapter(work / "sim-state" / "global").r == 8
    assert set(changes) <= used, set(changes) - used
