"""Federation server cost per round at SmolLM2-135M shapes, and bytes per device per round at each rank.

    .venv/bin/python bench/federation.py [--replies 100] [--targets q_proj,v_proj]
        [--ranks 4,8,16] [--methods flexlora,hetlora,fedavg] [--rounds 2] [--json docs/bench/federation.json]

A package is written at SmolLM2-135M's shapes (30 layers; its manifest and per-rank initial PEFT adapters
are real, its program files placeholders: the server reads nothing else). The real strategy (ServerApp's
``build_strategy`` + Flower's ``Strategy.start``) then runs ``--rounds`` rounds against ``--replies`` devices
on an in-process Grid (tests/fed_helpers.py); the devices' ranks cycle through ``--ranks`` and each returns
the adapter it received plus noise. Every message is encoded and decoded as Flower transports it (records,
arrays and 5 MiB array chunks deflated to bytes and inflated back).

Server-side time per round, the sum of:
* configure — distributing the global adapter to each rank and building the messages;
* encode    — deflating the outgoing messages (what the ServerApp does to push them);
* decode    — inflating the replies (what it does to pull them);
* validation, aggregation — :mod:`lorafleet.server.validation` on every reply, then the method's aggregation;
* bounds, finite_check — the trust checks of :mod:`lorafleet.server.replies`: every reply's weight change against the
  adapter it was sent (and the example cap), and the aggregate's finiteness before it is accepted;
* checkpoint — writing ``global/`` and ``state.json`` atomically.
The devices' own work, the network and the SuperLink process (which stores and forwards the same objects)
are not included; the last round is reported (the first also holds the one-off rank query).

Bytes per device per round: the train message (server → device) and the reply (device → server) as Flower
serializes them, next to the adapter's raw float32 size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fed_helpers import LoopbackGrid, decode, encode  # noqa: E402

from lorafleet.export.compiler.architectures import ARCHITECTURES, module_shapes  # noqa: E402
from lorafleet.export.formats import protocol as P  # noqa: E402
from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, write_adapter  # noqa: E402
from lorafleet.export.formats.manifest import Estimates, ModelSection  # noqa: E402
from lorafleet.export.formats.package import PackageSpec, RankRecord, write_package  # noqa: E402

ARCH = "smollm2-135m"
ALPHA = 16.0


def build_package(out: Path, ranks: list[int], targets: list[str]) -> Path:
    """A package at SmolLM2-135M shapes: real manifest and initial adapters, placeholder programs."""
    import torch

    arch = ARCHITECTURES[ARCH]
    shapes = {t: module_shapes(type("C", (), arch.hf_config_dict()))[t] for t in targets}
    model = ModelSection(spec=f"random:{ARCH}", architecture="LlamaForCausalLM", model_type="llama",
                         num_layers=arch.num_hidden_layers, hidden_size=arch.hidden_size,
                         intermediate_size=arch.intermediate_size, num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_key_value_heads, vocab_size=arch.vocab_size,
                         num_parameters=134_515_008, module_shapes={k: list(v) for k, v in shapes.items()})
    spec = PackageSpec(model=model, target_modules=targets, lora_alpha=ALPHA, seq_len=64, batch_size=1,
                       runtimes=["onnx"])
    g = torch.Generator().manual_seed(0)
    with write_package(out) as w:
        w.foundation("onnx").write_bytes(b"placeholder")
        records = []
        for r in ranks:
            mods = {}
            for layer in range(arch.num_hidden_layers):
                for t, (o, i) in shapes.items():
                    block = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    mods[f"model.layers.{layer}.{block}.{t}"] = LoraPair(  # A (r, in), B (out, r) = 0: PEFT's init
                        torch.randn(r, i, generator=g) / i ** 0.5, torch.zeros(o, r), ALPHA / r)
            adapter = Adapter(mods, peft_config(targets, r, ALPHA))
            write_adapter(adapter, w.path(r, "adapter"))
            d = w.path(r, "onnx_training")
            d.mkdir()
            (d / "training_model.onnx").write_bytes(b"placeholder")
            records.append(RankRecord(r, adapter.num_parameters(), Estimates(0, 0, {})))
        w.finish(spec, records, {"passed": True, "checks": ["bench placeholder"]})
    return out


class TimedGrid(LoopbackGrid):
    """LoopbackGrid that times the server's halves of the encoding and counts bytes per message."""

    def __init__(self, devices: dict[int, Any]):
        super().__init__(devices)
        self.encode_s = self.decode_s = 0.0
        self.bytes: list[dict[str, int]] = []  # per train message: rank, down, up

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message

        replies = []
        for msg in messages:
            t = time.perf_counter()
            root, objects = encode(msg.content)  # the server deflates what it pushes
            self.encode_s += time.perf_counter() - t
            node = msg.metadata.dst_node_id
            delivered = Message(decode(root, objects), dst_node_id=node, message_type=msg.metadata.message_type)
            answer = self.devices[node](delivered)
            back_root, back_objects = encode(answer.content)  # the device's work: not timed
            t = time.perf_counter()
            content = decode(back_root, back_objects)  # the server inflates what it pulls
            self.decode_s += time.perf_counter() - t
            replies.append(Message(content, reply_to=delivered))
            if msg.metadata.message_type == "train":
                self.bytes.append({"rank": int(msg.content["config"][P.RANK]),
                                   "down": sum(map(len, objects.values())), "up": sum(map(len, back_objects.values()))})
        return replies


def device(rank: int, seed: int):
    rng = np.random.default_rng(seed)

    def answer(msg):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        if msg.metadata.message_type == "query":
            return Message(RecordDict({P.METRICS: MetricRecord({P.RANK: rank})}), reply_to=msg)
        r = int(msg.content["config"][P.RANK])
        out = {k: Array((a.numpy() + 0.01 * rng.standard_normal(a.shape)).astype(np.float32))
               for k, a in msg.content["arrays"].items()}
        metrics = MetricRecord({P.NUM_EXAMPLES: 50 + seed % 50, P.RANK: r, P.LOSS: 1.0})
        return Message(RecordDict({P.ARRAYS: ArrayRecord(out), P.METRICS: metrics}), reply_to=msg)
    return answer


def run_method(package: Path, method: str, replies: int, ranks: list[int], rounds: int, state: Path) -> dict:
    from flwr.app import ArrayRecord

    from lorafleet.server.server_app import ServerConfig, build_strategy

    cfg = ServerConfig(package=str(package), method=method, rounds=rounds, state_dir=str(state),
                       min_clients=replies, round_timeout=600.0)
    strategy, _ = build_strategy(cfg)
    ckpt = strategy.checkpoint
    assert ckpt is not None
    saves: list[float] = []
    original = ckpt.save

    def timed_save(*a: Any, **k: Any) -> None:
        t = time.perf_counter()
        original(*a, **k)
        saves.append(time.perf_counter() - t)

    ckpt.save = timed_save  # type: ignore[method-assign]
    grid = TimedGrid({1000 + i: device(ranks[i % len(ranks)], i) for i in range(replies)})
    per_round = []
    for _ in range(rounds):
        grid.encode_s = grid.decode_s = 0.0
        grid.bytes = []
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1, timeout=600.0)  # type: ignore[arg-type]
        strategy.round_offset = strategy.state.round
        h = strategy.state.history[-1]
        parts = {"configure": h["seconds"]["configure"], "encode": grid.encode_s, "decode": grid.decode_s,
                 "validation": h["seconds"]["validation"], "bounds": h["seconds"]["bounds"],
                 "aggregation": h["seconds"]["aggregation"], "finite_check": h["seconds"]["finite_check"],
                 "checkpoint": saves[-1]}
        per_round.append({"round": h["round"], "valid": len(h["valid"]), "seconds": parts,
                          "server_seconds": sum(parts.values()), "bytes": list(grid.bytes)})
    return {"method": method, "rounds": per_round}


def bytes_by_rank(result: dict, package: Path) -> dict[int, dict[str, int]]:
    from lorafleet.export.formats.package import open_package

    m = open_package(package, verify=False).manifest
    out: dict[int, dict[str, int]] = {}
    for b in result["rounds"][-1]["bytes"]:
        out.setdefault(b["rank"], {"adapter_fp32": 4 * m.rank(b["rank"]).trainable_parameters,
                                   "down": b["down"], "up": b["up"]})
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replies", type=int, default=100)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--methods", default="flexlora,hetlora,fedavg")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    targets = args.targets.split(",")
    results: dict[str, Any] = {
        "command": " ".join(sys.argv), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "load_average_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "arch": ARCH, "targets": targets, "ranks": ranks, "replies": args.replies, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-fed-") as tmp:
        package = build_package(Path(tmp) / "pkg", ranks, targets)
        for method in args.methods.split(","):
            res = run_method(package, method, args.replies, ranks, args.rounds, Path(tmp) / f"state-{method}")
            last = res["rounds"][-1]
            res["bytes_by_rank"] = bytes_by_rank(res, package)
            for r in res["rounds"]:
                del r["bytes"]
            results["methods"][method] = res
            parts = ", ".join(f"{k} {v:.2f}" for k, v in last["seconds"].items())
            checks = last["seconds"]["bounds"] + last["seconds"]["finite_check"]
            print(f"{method}: round {last['round']}: {last['valid']} valid replies, server "
                  f"{last['server_seconds']:.2f} s ({parts}); trust checks {checks:.3f} s = "
                  f"{100 * checks / last['seconds']['aggregation']:.1f} % of the aggregation", flush=True)
            for r, b in res["bytes_by_rank"].items():
                print(f"  rank {r}: adapter {b['adapter_fp32'] / 1e6:.3f} MB, down {b['down'] / 1e6:.3f} MB, "
                      f"up {b['up'] / 1e6:.3f} MB")
    results["load_average_after"] = os.getloadavg()
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB; load average {results['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
