"""`lorafleet serve` and `lorafleet client`: bad input is one line and a non-zero exit, before any process
starts (the real runs are in test_federation_deploy.py)."""

from __future__ import annotations

import pytest
from export_helpers import fake_package, random_adapter
from fed_helpers import write_data

from lorafleet.cli import main
from lorafleet.federation import Tls, parse_address
from lorafleet.server.checkpoint import Checkpoint, ServerState


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return fake_package(tmp_path_factory.mktemp("fed-cli") / "pkg", ranks=(2, 4), runtimes=("onnx",))


def serve(package, tmp_path, *extra: str) -> list[str]:
    return ["serve", "--package", str(package), "--method", "hetlora", "--rounds", "2", "--address",
            "127.0.0.1:1", "--state", str(tmp_path / "state"), *extra]


def error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_serve_refuses_a_used_state_directory(package, tmp_path, capsys):
    Checkpoint(tmp_path / "state").save(ServerState(method="hetlora", rounds=2, round=1, history=[{"round": 1}]),
                                         random_adapter(4))
    assert main(serve(package, tmp_path)) == 1
    assert "already holds a run (hetlora, round 1 of 2): pass --resume" in error(capsys)
    assert main(serve(package, tmp_path, "--resume", "--method", "flexlora")) == 1
    assert "holds a hetlora run; it cannot resume as flexlora" in error(capsys)


@pytest.mark.parametrize(("args", "message"), [
    (["--address", "localhost"], "address must be HOST:PORT, got 'localhost'"),
    (["--ssl-certfile", "/nonexistent.pem"], "TLS needs all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile"),
    (["--fraction", "0"], r"fraction must be in (0, 1], got 0.0"),
    (["--package", "/nonexistent"], "is not an edge package"),
])
def test_serve_input_errors(package, tmp_path, capsys, args, message):
    assert main(serve(package, tmp_path, *args)) == 1
    assert message in error(capsys)
    assert not (tmp_path / "state" / "flower").exists()  # nothing was started


def test_client_input_errors(package, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", 2, 0)
    base = ["client", "--server", "127.0.0.1:1", "--package", str(package), "--data", str(data)]
    assert main(base) == 1
    assert "give exactly one of --profile FILE (an emulated device) or --measure" in error(capsys)
    assert main([*base, "--measure", "--profile", "pixel-8"]) == 1
    assert "give exactly one of" in error(capsys)
    assert main([*base, "--profile", "no-such-device"]) == 1
    assert "device profile not found: no-such-device" in error(capsys)
    assert main([*base[:-1], str(tmp_path / "missing.jsonl"), "--measure"]) == 1
    assert "data file not found" in error(capsys)
    assert main([*base, "--measure", "--root-certificates", "/nonexistent-ca.pem"]) == 1
    assert "TLS file not found: /nonexistent-ca.pem" in error(capsys)


def test_addresses_and_tls_files(tmp_path):
    assert parse_address("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert parse_address("[::1]:9092") == ("::1", 9092)
    for bad in ("9092", "host:", "host:0", "host:70000", ":9092"):
        with pytest.raises(ValueError, match="address must be HOST:PORT"):
            parse_address(bad)
    Tls().check_server()  # plaintext
    with pytest.raises(ValueError, match="TLS file not found"):
        Tls("/a", "/b", "/c").check_server()
