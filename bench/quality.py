"""Fleet quality: raFLoRA vs FlexLoRA vs HetLoRA vs FedAvg at the fleet's smallest and largest rank, on the
same fleet, with paired bootstrap intervals of each method's difference from FedAvg at the smallest rank.

    .venv/bin/python bench/quality.py                   # --config cpu: 3 seeds, 8 examples per family
    .venv/bin/python bench/quality.py --config reduced  # a shared 2-core machine: 1 seed, 4 per family
    .venv/bin/python bench/quality.py --config large --gpus-per-device 0.1 [--ray-address HOST:PORT]
                                                        # a GPU machine or a Ray cluster with GPUs

The model is ``smollm2-135m`` on the built-in task suite (seen families trained on, non-IID across devices by
Dirichlet α = 0.5; held-out families only evaluated, zero-shot). One package, one profile of this machine and
one evaluator serve every run. The devices come from the bundled profiles, each with the rank the profiler's
rule gives it under the round deadline; the deadline is the one (from a grid) under which the bundled
profiles' ranks are most varied — a server policy, the ranks still come from the rule. A *rank distribution*
is a fleet composition: the profile mix that puts the wanted share of devices at each of those ranks —
``uniform`` (equal shares) or ``heavy-tailed`` (halving shares from the smallest rank up: most devices are
the weakest, as in FlexLoRA's heavy-tail setting, Bai et al., NeurIPS 2024). For each distribution and seed
the same fleet (devices, data, availability, sampling) runs five ways:

* ``raflora``, ``flexlora``, ``hetlora`` — every device at its own rank;
* ``fedavg@min`` — every participant at the fleet's smallest rank (what all of them can train: the "bucket");
* ``fedavg@max`` — every participant at the fleet's largest rank, ignoring what the devices can train (and so
  without a deadline: a device's limits do not exist in this run): the bound without the bucket effect.

Reported: held-out and seen Rouge-L (and exact match, loss) of the final global adapter, with the untrained
baseline; devices aggregated per round; and for every method, per distribution, its difference from
``fedavg@min`` on held-out Rouge-L, seen Rouge-L and held-out loss with a 95 % paired bootstrap interval over
the evaluation examples, stratified by seed and family (:mod:`lorafleet.fleet.compare`). Printed as tables
and written to ``--json``. With ``--gpus-per-device F`` the simulation workers get GPU shares and train with the
torch backend on CUDA, and the evaluation runs on CUDA; ``--ray-address`` runs the fleets on a running Ray
cluster (lorafleet installed at the same paths on its nodes). ``--availability 1`` gives every profile that
availability (copies of the bundled profiles, nothing else changed): every sampled device is online, so a
comparison of the aggregation rules is not also a draw of who shows up. The JSON is rewritten after every run
(``"complete": false`` until the last), so a run cut short keeps what it measured.
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
    # 2 distributions × 5 methods × 3 seeds; 48 families × 8 examples: 384 held-out pairs per comparison, a
    # 95 % half-width of about 0.02 Rouge-L for a per-example spread of 0.2 (docs/BENCHMARKS.md, "Fleet quality")
    "cpu": {"devices": 24, "rounds": 3, "fraction": 0.5, "local_steps": 5, "eval_per_family": 8, "seeds": [0, 1, 2]},
    # what a 2-core machine shared with other jobs can take
    "reduced": {"devices": 12, "rounds": 2, "fraction": 0.5, "local_steps": 5, "eval_per_family": 4, "seeds": [0]},
    # a 16-core machine (the project's GPU machines): more devices, rounds, evaluation and seeds
    "large": {"devices": 100, "rounds": 10, "fraction": 0.2, "local_steps": 10, "eval_per_family": 8,
              "seeds": [0, 1, 2]},
}
RUNS = {"raflora": ("raflora", "fleet-min"), "flexlora": ("flexlora", "fleet-min"), "hetlora": ("hetlora", "fleet-min"),
        "fedavg@min": ("fedavg", "fleet-min"), "fedavg@max": ("fedavg", "fleet-max")}
REFERENCE = "fedavg@min"
COMPARED = (("heldout", "rouge_l"), ("seen", "rouge_l"), ("heldout", "loss"))
DEADLINES = (5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0)
RANKS = (4, 16, 64)  # the demo's package: cached once exported
SHOWN = ("heldout/rouge_l", "seen/rouge_l", "heldout/exact_match", "seen/exact_match", "heldout/loss", "seen/loss")


def profile_ranks(pkg: Any, local_steps: int, deadline: float) -> dict[str, int | None]:
    """Each bundled profile's rank under ``deadline``: the profiler's rule on the fleet's ``flops`` emulation
    (the package's per-rank FLOPs and memory, the profile's throughput: the same on any host at any load)."""
    from lorafleet.edge_client.device import emulate
    from lorafleet.edge_client.profiles import load_all
    from lorafleet.edge_client.rank_choice import Budgets, choose_rank
    from lorafleet.fleet.plan import flops_predictions

    budgets = Budgets(time_budget_seconds=deadline, steps_per_round=local_steps)
    return {p.id: choose_rank(emulate(p, p.sustained_gflops), flops_predictions(pkg, p), budgets).selected_rank
            for p in load_all()}


def pick_deadline(pkg: Any, local_steps: int) -> tuple[float, dict[str, int | None]]:
    """The deadline of :data:`DEADLINES` giving the most distinct ranks (then the fewest unranked profiles)."""
    def score(d: float) -> tuple[int, int, float]:
        ranks = profile_ranks(pkg, local_steps, d)
        return len({r for r in ranks.values() if r}), -sum(r is None for r in ranks.values()), d

    best = max(DEADLINES, key=score)
    return best, profile_ranks(pkg, local_steps, best)


def mix_for(distribution: str, ranks: dict[str, int | None]) -> dict[str, float]:
    """Profile weights giving each rank its share: equal (uniform) or halving from the smallest (heavy-tailed)."""
    by_rank: dict[int, list[str]] = {}
    for pid, r in ranks.items():
        if r is not None:
            by_rank.setdefault(r, []).append(pid)
    order = sorted(by_rank)
    share = {r: (1.0 if distribution == "uniform" else 0.5 ** i) for i, r in enumerate(order)}
    return {pid: share[r] / len(by_rank[r]) for r in order for pid in by_rank[r]}


def profiles_with_availability(availability: float, work: Path) -> Path:
    """Copies of the bundled profiles in ``work/profiles`` with their ``availability`` set, nothing else."""
    import re

    from lorafleet.edge_client.profiles import PROFILES_DIR

    if not 0 < availability <= 1:
        raise SystemExit(f"--availability {availability:g} must lie in (0, 1]")
    out = work / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(PROFILES_DIR.glob("*.toml")):
        text, n = re.subn(r"^availability = [0-9.eE+-]+[ \t]*$", f"availability = {availability!r}",
                          src.read_text(), count=1, flags=re.MULTILINE)
        if n != 1:
            raise SystemExit(f"{src.name}: no numeric availability line to set")
        (out / src.name).write_text(text)
    return out


def run_all(args: argparse.Namespace, cfg: dict[str, Any], work: Path,
            save: Any = lambda partial: None) -> dict[str, Any]:
    from lorafleet.fleet import make_evaluator, prepare, run_fleet
    from lorafleet.fleet.config import FleetConfig
    from lorafleet.fleet.server import FleetProgress

    class Log(FleetProgress):
        def stage(self, text: str) -> None:
            print(f"    {text}", flush=True)

    base = FleetConfig(devices=cfg["devices"], rounds=cfg["rounds"], model=args.model, method="flexlora", seed=0,
                       out=work / "base", fraction=cfg["fraction"], local_steps=cfg["local_steps"], ranks=args.ranks,
                       eval_per_family=cfg["eval_per_family"], eval_every=0,
                       gpus_per_device=args.gpus_per_device, ray_address=args.ray_address,
                       **({} if args.availability is None else
                          {"profiles_dir": profiles_with_availability(args.availability, work)}))
    prep = prepare(base, Log())
    deadline, ranks = pick_deadline(prep.package, cfg["local_steps"])
    print(f"deadline {deadline:g} s; profile ranks {ranks}", flush=True)
    evaluator = make_evaluator(base, prep.data, prep.package.manifest.seq_len)
    if args.eval_device != "cpu":
        evaluator.loaded.model.to(args.eval_device)
    head = {"deadline_s": deadline, "profile_ranks": ranks, "host": prep.host.to_json() if prep.host else None,
            "baseline": evaluator(None)}
    results: list[dict[str, Any]] = []
    examples: dict[tuple[str, str, int], Any] = {}  # (distribution, run, seed) -> the final evaluation's results
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
                examples[(distribution, name, seed)] = evaluator.last  # the last round's, each example's scores
                results.append(_summary(distribution, seed, name, result, time.perf_counter() - started))
                print(f"    -> {json.dumps({k: results[-1][k] for k in ('final', 'aggregated_per_round')})}",
                      flush=True)
                save({**head, "runs": results, "differences": differences(examples, cfg["seeds"])})
    return {**head, "runs": results, "differences": differences(examples, cfg["seeds"])}


def differences(examples: dict[tuple[str, str, int], Any], seeds: list[int]) -> list[dict[str, Any]]:
    """Every method's difference from :data:`REFERENCE` per distribution and compared metric, pooled over those
    of ``seeds`` both runs have (all of them once the benchmark is complete), with its 95 % paired bootstrap
    interval."""
    from lorafleet.fleet.compare import paired_difference

    rows = []
    for distribution in ("uniform", "heavy-tailed"):
        for name in RUNS:
            have = [s for s in seeds if all((distribution, n, s) in examples for n in (name, REFERENCE))]
            if name == REFERENCE or not have:
                continue
            for split, metric in COMPARED:
                d = paired_difference([examples[(distribution, name, s)][split].examples for s in have],
                                      [examples[(distribution, REFERENCE, s)][split].examples for s in have],
                                      metric=metric)
                rows.append({"distribution": distribution, "run": name, "split": split, "seeds": have,
                             **d.to_json()})
    return rows


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
    lines += ["", f"Difference from {REFERENCE} (95 % paired bootstrap interval; * = excludes 0):", "",
              "| distribution | run | " + " | ".join(f"{s} {m}" for s, m in COMPARED) + " |",
              "|---|---|" + "---:|" * len(COMPARED)]
    for distribution in ("uniform", "heavy-tailed"):
        for name in RUNS:
            rows = {(d["split"], d["metric"]): d for d in report.get("differences", [])
                    if d["distribution"] == distribution and d["run"] == name}
            if rows:
                cells = [f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{' *' if d['significant'] else ''}"
                         for d in (rows[c] for c in COMPARED)]
                lines.append(f"| {distribution} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", type=lambda t: tuple(int(x) for x in t.split(",")), default=RANKS,
                    help="packaged ranks (default 4,16,64)")
    ap.add_argument("--eval-device", default="", help="cpu or cuda (default: cuda for --config large if present)")
    ap.add_argument("--gpus-per-device", type=float, default=0.0,
                    help="GPU share of each simulation worker (torch trains on CUDA; default 0: CPU)")
    ap.add_argument("--ray-address", default=None, help="run the fleets on this running Ray cluster")
    ap.add_argument("--availability", type=float, default=None,
                    help="give every profile this availability, e.g. 1 (default: each profile's own)")
    ap.add_argument("--json", default="docs/bench/quality.json")
    args = ap.parse_args()
    if not args.eval_device:
        import torch

        args.eval_device = "cuda" if (args.config == "large" or args.gpus_per_device > 0) and \
            torch.cuda.is_available() else "cpu"
    cfg = CONFIGS[args.config]
    load_before, started = os.getloadavg(), time.perf_counter()

    def framed(partial: dict[str, Any], complete: bool) -> dict[str, Any]:
        return {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "machine": f"{os.cpu_count()} CPUs",
                "config": {"name": args.config, **cfg, "ranks": list(args.ranks), "availability": args.availability,
                           "gpus_per_device": args.gpus_per_device, "ray_address": args.ray_address,
                           "eval_device": args.eval_device},
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "wall_seconds": round(time.perf_counter() - started, 1), "complete": complete, **partial}

    def save(report: dict[str, Any]) -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.json).with_suffix(".json.tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            tmp.replace(args.json)

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        report = framed(run_all(args, cfg, Path(tmp), lambda partial: save(framed(partial, False))), True)
    save(report)
    print(table(report))


if __name__ == "__main__":
    main()
