"""Fleets on GPUs and on a running Ray cluster: the Ray settings a fleet asks for, the torch backend's device,
and a real fleet run on a Ray head started for the test.

This machine has no GPU, so what a GPU share does on one (Ray points the worker at its GPU, the torch backend
trains there) is not run here; the settings that ask for it and every refusal are.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lorafleet.cli import main
from lorafleet.edge_client.backends import OptimizerConfig, make_backend
from lorafleet.edge_client.backends.torch_backend import torch_device
from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.config import FleetConfig
from lorafleet.fleet.run import local_gpus, simulation_backend_config

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this test checks the refusal on a machine without CUDA")


def _cfg(tmp_path: Path, **kw) -> FleetConfig:
    return FleetConfig(devices=2, rounds=1, model="random:tiny", method="flexlora", seed=0, out=tmp_path / "o", **kw)


def test_a_local_instance_gets_the_workers_cpus_and_the_gpus_asked_for(tmp_path):
    cfg = _cfg(tmp_path, gpus_per_device=0.25)
    bc = simulation_backend_config(cfg, workers=6, gpus=2)
    assert bc["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert bc["init_args"]["num_cpus"] == 6 and bc["init_args"]["num_gpus"] == 2
    assert "address" not in bc["init_args"]
    cpu = simulation_backend_config(_cfg(tmp_path), workers=3, gpus=0)
    assert cpu["client_resources"]["num_gpus"] == 0.0 and cpu["init_args"]["num_gpus"] == 0


def test_a_cluster_is_joined_without_the_settings_ray_refuses_there(tmp_path):
    bc = simulation_backend_config(_cfg(tmp_path, ray_address="10.1.2.3:6379", gpus_per_device=0.5), workers=6, gpus=0)
    init = bc["init_args"]
    assert init["address"] == "10.1.2.3:6379"
    assert not {"num_cpus", "num_gpus", "object_store_memory", "resources"} & set(init)
    assert bc["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert local_gpus(_cfg(tmp_path, ray_address="auto", gpus_per_device=0.5)) == 0  # the cluster's GPUs decide


@pytest.mark.parametrize(("kw", "message"), [
    ({"gpus_per_device": 1.5}, r"gpus_per_device must be a GPU share in \[0, 1\]"),
    ({"gpus_per_device": -0.1}, r"gpus_per_device must be a GPU share"),
    ({"gpus_per_device": True}, r"gpus_per_device must be a GPU share"),
    ({"gpus_per_device": 0.5, "backend": "onnxruntime"}, "gpus_per_device needs the torch backend"),
    ({"ray_address": ""}, "ray_address must be a Ray cluster address"),
    ({"ray_address": "host :1"}, "ray_address must be a Ray cluster address"),
])
def test_bad_cluster_settings_are_refused(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **kw)


@NO_CUDA
def test_gpu_shares_without_a_gpu_are_one_line_before_anything_is_written(tmp_path, capsys):
    code = main(["fleet", "--devices", "2", "--rounds", "1", "--model", "random:tiny", "--method", "flexlora",
                 "--seed", "0", "--gpus-per-device", "0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "gpus_per_device 0.5: torch sees no CUDA device" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["gpu", "cpu:0", "cuda:x", "cuda:-1", ""])
def test_a_device_that_is_not_one_is_refused(spec):
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        torch_device(spec)


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_says_why(spec):
    with pytest.raises(ConfigError, match=f"device {spec!r}: torch sees no CUDA device"):
        torch_device(spec)


def test_cpu_is_a_device_and_only_torch_takes_another(tiny_package):
    from lorafleet.export.formats.package import open_package

    assert torch_device(" CPU ") == torch.device("cpu")
    pkg = open_package(tiny_package)
    with pytest.raises(ConfigError, match="only the torch backend runs on a GPU; onnxruntime"):
        make_backend("onnxruntime", pkg, pkg.ranks[0], OptimizerConfig(), device="cuda")
    backend = make_backend("torch", pkg, pkg.ranks[0], OptimizerConfig(), device="cpu")
    assert backend.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for pair in backend.adapter_state().modules.values()
               for t in (pair.lora_A, pair.lora_B))


# --- a real fleet on a running Ray cluster -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:  # the kernel's ephemeral range: outside Ray's worker ports (10002-19999)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head`` in its own session and temp dir (2 CPUs); its address; stopped with its group.
    Ray binds the node's address, not loopback (``ray start`` turns 127.0.0.1 into it), as the simulation
    engine's own local instance does."""
    ray = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="lf-ray-"))  # short: Ray's socket paths must fit 107 bytes
    log = tmp_path / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--port", str(_free_port()), "--num-cpus", "2", "--num-gpus",
             "0", "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
             "--disable-usage-stats", "--temp-dir", str(temp)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            found = re.search(r"ray start --address='([^']+)'", log.read_text())
            address = found.group(1) if found else None
        if address is None:
            pytest.fail(f"ray start --head did not come up: {log.read_text()[-2000:]}")
        yield address, temp
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # --block: the head stops its processes, then exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_fleet_runs_on_an_existing_ray_cluster(ray_head, tmp_path, monkeypatch):
    import json

    address, temp = ray_head
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["fleet", "--devices", "4", "--rounds", "1", "--model", "random:tiny", "--method", "flexlora",
                 "--local-steps", "2", "--seed", "0", "--ray-address", address, "--out", str(out)])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["ray_address"] == address
    assert report["rounds"][1]["participants"]
    # the devices trained in the cluster's own workers: their logs are in the head's temp dir
    logs = list(temp.glob("session_*/logs/worker-*.out"))
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs), [p.name for p in logs]
