"""What a device's owner gets from `lorafleet client`: a dry run that joins nothing, a log of one line per round
without Flower's colours or message ids, and a device that exits when the run is over (--exit-on-finish).

The package is a `random:tiny` ONNX-only export (the fastest real package). The federation itself (a real
`lorafleet serve` and two `lorafleet client`s on 127.0.0.1) is the README's first hour, in tests/test_readme.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from fed_helpers import lorafleet, process_env, profile_for_rank, write_data

from lorafleet.cli import main
from lorafleet.edge_client.events import RankEvent, RoundEvent, append_event, read_events, render
from lorafleet.federation import free_port
from lorafleet.federation.node_log import FlowerFilter


@pytest.fixture(scope="module")
def onnx_package(tmp_path_factory):
    from lorafleet.export.compiler.pipeline import ExportConfig, run_export

    out = tmp_path_factory.mktemp("owner") / "pkg"
    run_export(ExportConfig(out=out, model="random:tiny", ranks=(2, 4), target_modules=("q_proj", "v_proj"),
                            lora_alpha=16.0, seq_len=16, batch_size=1, runtimes=("onnx",)))
    return out


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- --dry-run ------------------------------------------------------------------------------------------

def test_dry_run_picks_the_profiled_rank_and_its_step_is_the_trainers(onnx_package, tmp_path, capsys, monkeypatch):
    from lorafleet.edge_client.data import read_jsonl
    from lorafleet.edge_client.trainer import train_local

    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    profile = profile_for_rank(tmp_path / "device.toml", onnx_package, 2, 600.0)  # the default query budget
    data = write_data(tmp_path / "data.jsonl", 6, 1)
    code, out, err = _cli(capsys, "client", "--dry-run", "--package", onnx_package, "--profile", profile,
                          "--data", data, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["rank"] == 2 and report["backend"] == "onnxruntime", report
    assert any("selected rank 2" in r for r in report["reasons"]), report["reasons"]
    assert report["peak_rss_bytes"] > 0 and report["step_seconds"] > 0 and report["num_examples"] == 6
    # the step it ran is the first step `lorafleet train` runs (same batch), and eager torch agrees on its loss
    examples = read_jsonl(data).examples
    for backend, tol in (("onnxruntime", 0.0), ("torch", 1e-4)):
        loss = train_local(onnx_package, 2, backend, examples, steps=1, seed=0).losses[0]
        assert abs(loss - report["loss"]) <= tol * abs(loss), (backend, loss, report["loss"])


def test_dry_run_summary_on_the_built_in_tasks(onnx_package, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    profile = profile_for_rank(tmp_path / "device.toml", onnx_package, 4, 600.0)
    code, out, err = _cli(capsys, "client", "--dry-run", "--package", onnx_package, "--profile", profile)
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    assert re.fullmatch(r"dry run: rank 4 on onnxruntime, one step of batch 1 from \d+ examples of the built-in "
                        r"tasks: loss \d+\.\d{4}, [\d.]+ m?s per step, peak RSS .+ of .+ available; no server "
                        r"contacted", line), line


@pytest.mark.parametrize("args, fragment", [
    (("--dry-run", "--server", "127.0.0.1:9092"), "drop --server"),
    ((), "needs --server HOST:PORT and --data FILE"),
])
def test_client_argument_errors_are_one_line(tmp_path, capsys, args, fragment):
    code, out, err = _cli(capsys, "client", "--package", tmp_path / "pkg", "--measure", *args)
    assert code != 0 and err.count("\n") == 1 and err.startswith("lorafleet: error: ") and fragment in err, err


# --- the owner's log ------------------------------------------------------------------------------------

FLOWER_OUTPUT = [  # as flower-supernode 1.42 prints them (colours included)
    "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode",
    "\x1b[93mWARNING \x1b[0m:   Option `--insecure` was set. Starting insecure channel to 127.0.0.1:9092.",
    "INFO:     Uvicorn running on http://127.0.0.1:9199 (Press CTRL+C to quit)",
    "\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: 3f2a9c0d11e4b7a8)",
    "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.13 seconds",
    "\x1b[92mINFO \x1b[0m:      Starting Flower SuperExec",
    "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.52 seconds",
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305",
    "Failed to initialize the connection to the SuperLink.",
    "\x1b[92mINFO \x1b[0m:      Sent successfully (ID: 77aa00bb)",
    "  a continuation of an INFO line",
]


def test_flower_output_is_cut_to_warnings_and_errors_without_colours_or_message_ids():
    keep = FlowerFilter()
    shown = [line for line in map(keep, FLOWER_OUTPUT) if line is not None]
    assert shown == [
        "flower: warning: Option `--insecure` was set. Starting insecure channel to 127.0.0.1:9092.",
        "flower: the server cannot be reached; retrying",  # once, not every few seconds
        "flower: error: Exit Code: 305",
        "Failed to initialize the connection to the SuperLink.",
    ]
    verbose = [FlowerFilter(verbose=True)(line) for line in FLOWER_OUTPUT]
    assert None not in verbose and "(ID: 3f2a9c0d11e4b7a8)" in verbose[3]
    assert not any("\x1b" in line for line in verbose)  # not a terminal: no colours
    assert FlowerFilter(verbose=True, color=True)(FLOWER_OUTPUT[0]) == FLOWER_OUTPUT[0]
    # after the run's last round the server going away is expected: its connection failures are not shown
    done = FlowerFilter(finished=True)
    gone = ["\x1b[93mWARNING \x1b[0m:   Giving up reconnection after 15.00 seconds and 7 tries.",
            "\x1b[91mERROR \x1b[0m:   [Errno 111] Connection refused", *FLOWER_OUTPUT]
    assert [line for line in map(done, gone) if line is not None] == [shown[0], shown[2], shown[3]]


def test_events_round_trip_and_render(tmp_path):
    path = tmp_path / "events.jsonl"
    first = RoundEvent(round=3, num_rounds=5, rank=8, steps=10, loss_first=2.31, loss_last=1.874, seconds=12.44,
                       num_examples=40)
    append_event(path, RankEvent(8))
    append_event(path, first)
    with open(path, "a") as f:
        f.write('{"kind": "round", "round"')  # a line still being written
    events, offset = read_events(path)
    assert events == [RankEvent(8), first] and not first.final
    assert render(first) == "round 3/5: rank 8, 10 steps on 40 examples, loss 2.3100 → 1.8740, 12.4 s"
    assert read_events(path, offset) == ([], offset)
    assert RoundEvent(5, 5, 8, 10, 1.0, 1.0, 1.0, 1).final and not RoundEvent(5, 0, 8, 10, 1.0, 1.0, 1.0, 1).final


# --- a real federation -------------------------------------------------------------------------------------
# Two devices over TLS that print one line per round and exit when the run is over: tests/test_readme.py runs
# the README's first hour, which is that federation.

@pytest.mark.slow
def test_a_device_with_exit_on_finish_gives_up_on_a_server_that_is_not_there(onnx_package, tmp_path):
    start = time.monotonic()
    proc = subprocess.run(lorafleet("client", "--server", f"127.0.0.1:{free_port()}", "--package", str(onnx_package),
                                    "--data", str(write_data(tmp_path / "d.jsonl", 2, 0)), "--measure",
                                    "--exit-on-finish"),
                          env=process_env(tmp_path / "cache"), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert proc.stderr.strip().splitlines()[-1].startswith("lorafleet: error: the SuperNode stopped with status")
    assert "flower: the server cannot be reached; retrying" in proc.stdout
    assert proc.stdout.count("cannot be reached") == 1 and "\x1b[" not in proc.stdout, proc.stdout

