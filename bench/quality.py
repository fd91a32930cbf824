"""Fleet quality: FlexLoRA vs HetLoRA vs FedAvg at the fleet's smallest and largest rank, on the same fleet.

    .venv/bin/python bench/quality.py                   # --config cpu: about an hour on 2 cores
    .venv/bin/python bench/quality.py --config reduced  # a shared 2-core machine
    .venv/bin/python bench/quality.py --config large    # a 16-core (GPU) machine, 3 seeds

The model is ``smollm2-135m`` on the built-in task suite (seen families trained on, non-IID across devices by
Dirichlet α = 0.5; held-out families only evaluated, zero-shot). One package, one profile of this machine and
one evaluator serve every run. The devices come from the bundled profiles, each with the rank the profiler's
rule gives it under the round deadline; the deadline is the one (from a grid) under which the bundled
profiles' ranks are most varied — a server policy, the ranks still come from the rule. A *rank distribution*
is a fleet composition: the profile mix that puts the wanted share of devices at each of those ranks —
``uniform`` (equal shares) or ``heavy-tailed`` (halving shares from the smallest rank up: most devices are
the weakest, as in FlexLoRA's heavy-tail setting, Bai et al., NeurIPS 2024). For each distribution and seed
the same fleet (devices, data, availability, sampling) runs four ways:

* ``flexlora``, ``hetlora`` — every device at its own rank;
* ``fedavg@min`` — every participant at the fleet's smallest rank (what all of them can train: the "bucket");
* ``fedavg@max`` — every participant at the fleet's largest rank, ignoring what the devices can train (and so
  without a deadline: a device's limits do not exist in this run): the bound without the bucket effect.

Reported: held-out and seen Rouge-L (and exact match, loss) of the final global adapter, with the untrained
baseline; devices aggregated per round. Printed as a table and written to ``--json``. ``--config large``
evaluates on CUDA when it is available (local training runs on the CPU backends either way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    # ≈ 1 h on an idle 2-core CPU machine
    "cpu": {"devices": 24, "rounds": 3, "fraction": 0.5, "local_steps": 5, "eval_per_family": 2, "seeds": [0]},
    # what a 2-core machine shared with other jobs can take
    "reduced": {"devices": 12, "rounds": 2, "fraction": 0.5, "local_steps": 5, "eval_per_family": 2, "seeds": [0]},
    # a 16-core machine (the project's GPU machines): more devices, rounds, evaluation and seeds
    "large": {"devices": 100, "rounds": 10, "fraction": 0.2, "local_steps": 10, "eval_per_family": 8,
              "seeds": [0, 1, 2]},
}
RUNS = {"flexlora": ("flexlora", "fleet-min"), "hetlora": ("hetlora", "fleet-min"),
        "fedavg@min": ("fedavg", "fleet-min"), "fedavg@max": ("fedavg", "fleet-max")}
DEADLINES = (5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0)
RANKS = (4, 16, 64)  # the demo's package: cached once exported
SHOWN = ("heldout/rouge_l", "seen/rouge_l", "heldout/exact_match", "seen/exact_match", "heldout/loss", "seen/loss")


def profile_ranks(host: Any, local_steps: int, deadline: float) -> dict[str, int | None]:
    """Each bundled profile's rank under ``deadline`` (the profiler's rule)."""
    from lorafleet.edge_client.device import emulate
    from lorafleet.edge_client.profiles import load_all
    from lorafleet.edge_client.rank_choice import Budgets, choose_rank

    budgets = Budgets(time_budget_seconds=deadline, steps_per_round=local_steps)
    return {p.id: choose_rank(emulate(p, host.gflops), host.result.predictions, budgets).selected_rank
            for p in load_all()}


def pick_deadline(host: Any, local_steps: int) -> tuple[float, dict[str, int | None]]:
    """The deadline of :data:`DEADLINES` giving the most distinct ranks (then the fewest unranked profiles)."""
    def score(d: float) -> tuple[int, int, float]:
        ranks = profile_ranks(host, local_steps, d)
        return len({r for r in ranks.values() if r}), -sum(r is None for r in ranks.values()), d

    best = max(DEADLINES, key=score)
    return best, profile_ranks(host, local_steps, best)


def mix_for(distribution: str, ranks: dict[str, int | None]) -> dict[str, float]:
    """Profile weights giving each rank its share: equal (uniform) or halving from the smallest (heavy-tailed)."""
    by_rank: dict[int, list[str]] = {}
    for pid, r in ranks.items():
        if r is not None:
            by_rank.setdefault(r, []).append(pid)
    order = sorted(by_rank)
    share = {r: (1.0 if distribution == "uniform" else 0.5 ** i) for i, r in enumerate(order)}
    return {pid: share[r] / len(by_rank[r]) for r in order for pid in by_rank[r]}


def run_all(args: argparse.Namespace, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    from lorafleet.fleet import make_evaluator, prepare, run_fleet
    from lorafleet.fleet.config import FleetConfig
    from lorafleet.fleet.server import FleetProgress

    class Log(FleetProgress):
        def stage(self, text: str) -> None:
            print(f"    {text}", flush=True)

    base = FleetConfig(devices=cfg["devices"], rounds=cfg["rounds"], model=args.model, method="flexlora", seed=0,
                       out=work / "base", fraction=cfg["fraction"], local_steps=cfg["local_steps"], ranks=args.ranks,
                       eval_per_family=cfg["eval_per_family"], eval_every=0)
    prep = prepare(base, Log())
    deadline, ranks = pick_deadline(prep.host, cfg["local_steps"])
    print(f"deadline {deadline:g} s; profile ranks {ranks}", flush=True)
    evaluator = make_evaluator(base, prep.data, prep.package.manifest.seq_len)
    if args.eval_device != "cpu":
        evaluator.loaded.model.to(args.eval_device)
    results: list[dict[str, Any]] = []
    for distribution in ("uniform", "heavy-tailed"):
        mix = mix_for(distribution, ranks)
        for seed in cfg["seeds"]:
            for name, (method, fedavg_rank) in RUNS.items():
                out = work / f"{distribution}-{seed}-{name}"
                limits = fedavg_rank != "fleet-max"
                run = FleetConfig(**{**_fields(base), "out": out, "seed": seed, "method": method, "mix": mix,
                                     "round_deadline": deadline if limits else None, "fedavg_rank": fedavg_rank})
                started = time.perf_counter()
                print(f"  {distribution} seed {seed} {name}", flush=True)
                result = run_fleet(run, progress=Log(), host=prep.host, evaluator=evaluator)
                results.append(_summary(distribution, seed, name, result, time.perf_counter() - started))
                print(f"    -> {json.dumps({k: results[-1][k] for k in ('final', 'aggregated_per_round')})}",
                      flush=True)
    return {"deadline_s": deadline, "profile_ranks": ranks, "host": prep.host.to_json(),
            "baseline": evaluator(None), "runs": results}


def _fields(cfg: Any) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _summary(distribution: str, seed: int, name: str, result: Any, seconds: float) -> dict[str, Any]:
    rounds = result.report.rounds
    ranks = [r for r in result.report.device_ranks.values() if r]
    return {"distribution": distribution, "seed": seed, "run": name, "wall_seconds": round(seconds, 1),
            "device_ranks": {str(r): ranks.count(r) for r in sorted(set(ranks))},
            "aggregated_per_round": [len(r.participants) for r in rounds[1:]],
            "update_ranks_last_round": {str(k): list(rounds[-1].ranks.values()).count(k)
                                        for k in sorted(set(rounds[-1].ranks.values()))},
            "dropped_per_round": [len(r.dropped) for r in rounds[1:]],
            "global_rank": result.global_rank,
            "final": {k: round(rounds[-1].metrics[k], 4) for k in SHOWN if k in rounds[-1].metrics}}


def table(report: dict[str, Any]) -> str:
    """The Markdown table of BENCHMARKS.md: mean over seeds per distribution and run."""
    base = report["baseline"]
    lines = ["| distribution | run | held-out Rouge-L | seen Rouge-L | held-out EM | seen EM | held-out loss | "
             "aggregated/round |", "|---|---|---:|---:|---:|---:|---:|---|",
             f"| – | untrained baseline | {base['heldout/rouge_l']:.4f} | {base['seen/rouge_l']:.4f} | "
             f"{base['heldout/exact_match']:.4f} | {base['seen/exact_match']:.4f} | {base['heldout/loss']:.4f} | – |"]
    for distribution in ("uniform", "heavy-tailed"):
        for name in RUNS:
            runs = [r for r in report["runs"] if r["distribution"] == distribution and r["run"] == name]
            if not runs:
                continue
            mean = {k: sum(r["final"][k] for r in runs) / len(runs) for k in SHOWN[:5]}
            agg = "; ".join(",".join(map(str, r["aggregated_per_round"])) for r in runs)
            lines.append(f"| {distribution} | {name} | {mean['heldout/rouge_l']:.4f} | {mean['seen/rouge_l']:.4f} | "
                         f"{mean['heldout/exact_match']:.4f} | {mean['seen/exact_match']:.4f} | "
                         f"{mean['heldout/loss']:.4f} | {agg} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", type=lambda t: tuple(int(x) for x in t.split(",")), default=RANKS,
                    help="packaged ranks (default 4,16,64)")
    ap.add_argument("--eval-device", default="", help="cpu or cuda (default: cuda for --config large if present)")
    ap.add_argument("--json", default="docs/bench/quality.json")
    args = ap.parse_args()
    if not args.eval_device:
        import torch

        args.eval_device = "cuda" if args.config == "large" and torch.cuda.is_available() else "cpu"
    cfg = CONFIGS[args.config]
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        report = run_all(args, cfg, Path(tmp))
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": f"{os.cpu_count()} CPUs", "config": {"name": args.config, **cfg, "ranks": list(args.ranks)},
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "wall_seconds": round(time.perf_counter() - started, 1), **report}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
