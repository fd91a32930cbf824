"""``lorafleet fleet``: an emulated fleet of edge devices on Flower's simulation engine.

    prepare:  profiles of the mix → device data (built-in task suite or JSONL) → sequence length →
              the edge package (exported once, cached) → (``measured`` emulation: this machine profiled) →
              each profile's rank (:mod:`lorafleet.fleet.plan`)
    run:      Flower's ``run_simulation`` (Ray backend): the ServerApp of :mod:`lorafleet.fleet.server`
              (the fleet strategy, evaluation every round) and the ClientApp of :mod:`lorafleet.fleet.client`
              on ``N`` virtual devices, training for real on this host
    finish:   ``DIR/global/`` (the final global adapter at the fleet's highest rank, a PEFT directory) and
              the report (``metrics.json``, ``metrics.csv``, plots, ``summary.md``), also rewritten each round

Training backend: eager torch + PEFT (:mod:`lorafleet.edge_client.backends.torch_backend`, the reference backend: same
loss and AdamW as the package's ONNX Runtime and ExecuTorch programs), kept loaded in every simulation worker.
A fleet worker serves a different device every time, and restarting AdamW on ONNX Runtime means reopening the
training session with its frozen weights on every device-round (docs/BENCHMARKS.md has both step times);
``FleetConfig.backend = "onnxruntime"`` runs the package's ORT programs instead.
Either way a device's round time is its profile's, not this host's: computed from the step's FLOPs (``flops``
emulation, the default: the same on any machine at any load) or this host's measured time scaled to the
profile (``measured``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.config import DATA_BUILTIN, FleetConfig
from lorafleet.fleet.server import FleetProgress

if TYPE_CHECKING:
    from lorafleet.edge_client.data import Example
    from lorafleet.edge_client.rank_choice import Budgets
    from lorafleet.export.formats.package import Package
    from lorafleet.fleet.plan import FleetPlan, HostProfile
    from lorafleet.fleet.records import FleetReport
    from lorafleet.fleet.server import Evaluator

DATA_DIR, GLOBAL_DIR, STATE_DIR = "data", "global", "state"
SEQ_LEN_SAMPLE = 16  # examples per family that size the sequence length of the built-in suite


@dataclass
class FleetData:
    devices: list[list[Example]]  # per device
    eval_splits: dict[str, dict[str, list[Example]]]  # {"seen": {family: examples}, "heldout": {...}}
    sizing: list[Example]  # what the sequence length must hold


@dataclass
class FleetResult:
    out: Path
    report: FleetReport
    plan: FleetPlan
    package: Path
    global_rank: int


def run_fleet(cfg: FleetConfig, *, progress: FleetProgress | None = None, host: HostProfile | None = None,
              evaluator: Evaluator | None = None) -> FleetResult:
    """Run the fleet ``cfg`` describes; the report and ``global/`` end up in ``cfg.out``.

    ``host`` (this machine's profile) and ``evaluator`` (the base model with the evaluation splits) may be
    passed in by a caller running several fleets on the same package and data (``bench/quality.py``)."""
    from lorafleet.fleet.client import device_data_path
    from lorafleet.fleet.data import write_device_data
    from lorafleet.fleet.plan import load_mix, plan_fleet

    progress = progress or FleetProgress()
    previous = _resumable(cfg) if cfg.resume else None
    if previous is None:
        _check_out(cfg.out)
    local_gpus(cfg)  # no GPU for the shares asked for: say so before anything is exported
    profiles = load_mix(cfg.profiles_dir, cfg.mix)
    prep = prepare(cfg, progress, host)
    plan = plan_fleet(prep.host, profiles, cfg.mix, cfg.devices, prep.budgets, cfg.seed, pkg=prep.package,
                      emulation=cfg.emulation, rank_distribution=cfg.rank_distribution, backend=cfg.backend)
    if not any(d.rank for d in plan.devices):
        raise ConfigError(f"no device of the fleet fits any packaged rank of {cfg.model} (ranks "
                          f"{list(cfg.ranks)}): {plan.devices[0].unable_reason}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_device_data(prep.data.devices, cfg.out / DATA_DIR, device_data_path)
    report = _new_report(cfg, plan, prep)
    if previous is not None:
        _check_same_fleet(previous, report)
        report.rounds = previous.rounds
    server = _simulate(cfg, prep, plan, report, progress, evaluator)
    global_rank = _write_global(cfg, server, plan, report)
    return FleetResult(cfg.out, report, plan, prep.package.path, global_rank)


@dataclass
class Prepared:
    """What a fleet needs before its devices exist: data, the package, this machine's profile, budgets."""

    data: FleetData
    package: Package
    host: HostProfile | None  # None: flops emulation, nothing measured here
    budgets: Budgets
    workers: int
    threads: int


def prepare(cfg: FleetConfig, progress: FleetProgress | None = None, host: HostProfile | None = None) -> Prepared:
    """Device data, the package (exported once, cached) and, for ``measured`` emulation, this machine's profile
    (unless ``host`` is given)."""
    from lorafleet.export.formats.package import open_package
    from lorafleet.fleet.package import fleet_package
    from lorafleet.fleet.plan import profile_host

    progress = progress or FleetProgress()
    progress.stage("generating device data")
    data = fleet_data(cfg)
    seq_len = cfg.seq_len or _fitting_seq_len(cfg.model, data.sizing)
    progress.stage(f"edge package for {cfg.model}")
    pkg_path, _ = fleet_package(cfg.model, cfg.ranks, cfg.target_modules, cfg.lora_alpha, seq_len,
                                quantize=cfg.quantize, log=progress.stage)
    pkg = open_package(pkg_path, verify=False)
    workers, threads = worker_layout(cfg.workers)
    budgets = fleet_budgets(cfg)
    if host is None and cfg.emulation == "measured":
        progress.stage(f"profiling this machine ({cfg.backend}, ranks {min(cfg.ranks)} and {max(cfg.ranks)})")
        with _threads(threads):
            host = profile_host(pkg, cfg.backend, budgets)
    return Prepared(data, pkg, host, budgets, workers, threads)


def fleet_data(cfg: FleetConfig) -> FleetData:
    """Every device's training examples, the evaluation splits, and a sample that sizes the sequences."""
    from lorafleet import tasks
    from lorafleet.fleet.data import builtin_device_data, jsonl_eval_split, split_examples

    sizing = [ex for split in ("seen", "heldout") for fam in tasks.families(split)
              for ex in tasks.generate(fam, SEQ_LEN_SAMPLE, seed=cfg.seed)]
    evals = tasks.eval_sets(cfg.eval_per_family, seed=cfg.seed)
    if cfg.data == DATA_BUILTIN:
        devices = builtin_device_data(cfg.devices, examples_per_device=cfg.examples_per_device,
                                      alpha=cfg.dirichlet_alpha, seed=cfg.seed)
        return FleetData(devices, evals, sizing)
    train, held = jsonl_eval_split(cfg.data, seed=cfg.seed)
    if not held:
        raise ConfigError(f"{cfg.data} needs at least two examples (one is held back for evaluation)")
    devices = split_examples(train, cfg.devices, seed=cfg.seed)
    return FleetData(devices, {"seen": {"jsonl": held}, "heldout": evals["heldout"]}, sizing + train + held)


def make_evaluator(cfg: FleetConfig, data: FleetData, seq_len: int) -> Evaluator:
    """The base model in memory with the fleet's evaluation splits (held-out and seen families), quantized as
    the package's base is (the weights the devices train over)."""
    from lorafleet.fleet.evaluate import EvalConfig
    from lorafleet.fleet.server import Evaluator

    return Evaluator(cfg.model, data.eval_splits, EvalConfig(
        per_family=cfg.eval_per_family, max_new_tokens=cfg.eval_max_new_tokens, seq_len=seq_len),
        quantize=cfg.quantize)


def fleet_budgets(cfg: FleetConfig) -> Budgets:
    """The devices' budgets: memory fraction, and the round deadline as the time of ``local_steps`` steps."""
    from lorafleet.edge_client.rank_choice import Budgets

    return Budgets(memory_fraction=cfg.memory_fraction, time_budget_seconds=cfg.round_deadline,
                   steps_per_round=cfg.local_steps)


def simulation_backend_config(cfg: FleetConfig, workers: int, gpus: int) -> dict[str, Any]:
    """Flower's Ray backend settings: every virtual device's worker takes one CPU and ``cfg.gpus_per_device``
    of a GPU. Without ``cfg.ray_address`` a local Ray instance is started with ``workers`` CPUs and ``gpus``
    GPUs; with it the run joins that cluster, whose nodes' resources decide how many workers run (Ray refuses
    CPU/GPU/memory settings when joining; the cluster's nodes need lorafleet importable at the driver's paths)."""
    quiet = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    init: dict[str, Any] = {"address": cfg.ray_address, **quiet} if cfg.ray_address is not None else \
        {"num_cpus": workers, "num_gpus": gpus, **quiet, "object_store_memory": 512 * 2**20}
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(cfg.gpus_per_device)}, "init_args": init}


def local_gpus(cfg: FleetConfig) -> int:
    """The GPUs a locally started Ray instance offers: every CUDA device torch sees when the fleet's workers
    are given GPU shares (a one-line error when there is none), else 0."""
    if cfg.gpus_per_device == 0 or cfg.ray_address is not None:
        return 0
    count = _cuda_count()
    if count == 0:
        import torch

        raise ConfigError(f"gpus_per_device {cfg.gpus_per_device:g}: torch sees no CUDA device on this machine "
                          f"(torch {torch.__version__}); train on the CPU (0) or give --ray-address of a "
                          "cluster with GPUs")
    return count


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_layout(workers: int) -> tuple[int, int]:
    """``(simulation workers, threads each)``: by default one single-threaded worker per usable CPU."""
    from lorafleet.edge_client.device import cpu_count

    cpus = cpu_count()
    n = workers or cpus
    return n, max(1, cpus // n)


# --- internals ------------------------------------------------------------------------------------------

def _resumable(cfg: FleetConfig) -> FleetReport:
    """The report of the run to resume in ``cfg.out`` (its checkpoint must be there too)."""
    from lorafleet.fleet.records import METRICS_JSON, read_report
    from lorafleet.server.checkpoint import Checkpoint

    if not (cfg.out / METRICS_JSON).is_file() or not Checkpoint(cfg.out / STATE_DIR).exists():
        raise ConfigError(f"--resume: {cfg.out} holds no fleet run to resume (no {METRICS_JSON} and "
                          f"{STATE_DIR}/ from an earlier lorafleet fleet)")
    return read_report(cfg.out)


def _check_same_fleet(previous: FleetReport, now: FleetReport) -> None:
    """A resumed run must be the run it continues: the same settings, the same devices and ranks."""
    for key, value in now.config.items():
        if key in ("simulation_workers", "threads_per_worker", "gpus_per_device", "ray_address"):  # where, not what
            continue
        if previous.config.get(key) != value:
            raise ConfigError(f"--resume: {key} is {value!r}, the run being resumed had "
                              f"{previous.config.get(key)!r}; resume with the same settings")
    if previous.device_ranks != now.device_ranks or previous.device_profiles != now.device_profiles:
        raise ConfigError("--resume: the fleet plan differs from the run being resumed (measured emulation "
                          "re-profiled this host and chose other ranks); only a flops-emulated fleet, or one "
                          "whose plan comes out the same, can be resumed")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} already exists and is not an empty directory")


def _fitting_seq_len(model: str, examples: list[Example]) -> int:
    from lorafleet.edge_client.tokenizer import load_tokenizer
    from lorafleet.fleet.data import fitting_seq_len

    return fitting_seq_len(load_tokenizer(model), examples)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Measure the host as a simulation worker trains: ``n`` threads (BLAS here, OpenMP in child processes)."""
    from threadpoolctl import threadpool_limits

    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _new_report(cfg: FleetConfig, plan: FleetPlan, prep: Prepared) -> FleetReport:
    from lorafleet.fleet.records import FleetReport

    config: dict[str, Any] = {**cfg.to_json(), "package": str(prep.package.path),
                              "seq_len": prep.package.manifest.seq_len, "simulation_workers": prep.workers,
                              "threads_per_worker": prep.threads}
    ranks = {str(d): dev.rank for d, dev in enumerate(plan.devices)}
    profiles = {str(d): dev.profile for d, dev in enumerate(plan.devices)}
    return FleetReport(config, ranks, [], profiles, plan.rank_choice_json(prep.budgets))


def _simulate(cfg: FleetConfig, prep: Prepared, plan: FleetPlan, report: FleetReport, progress: FleetProgress,
              evaluator: Evaluator | None) -> Any:
    from flwr.simulation import run_simulation

    from lorafleet.fleet.client import ClientPlan, make_fleet_client_app
    from lorafleet.fleet.server import ROUND_TIMEOUT, FleetServer, make_fleet_server_app
    from lorafleet.fleet.strategy import Emulation
    from lorafleet.server.server_app import ServerConfig

    pkg = prep.package
    if evaluator is None:
        progress.stage(f"loading {cfg.model} for evaluation")
        evaluator = make_evaluator(cfg, prep.data, pkg.manifest.seq_len)
        if cfg.gpus_per_device > 0 and _cuda_count() > 0:  # the workers train on GPUs: so does the evaluation
            evaluator.loaded.model.to("cuda")
    server_config = ServerConfig(package=str(pkg.path), method=cfg.method, rounds=cfg.rounds, min_clients=1,
                                 min_valid=1, fraction=1.0, round_timeout=ROUND_TIMEOUT, seed=cfg.seed,
                                 local_steps=cfg.local_steps, lr=cfg.lr, state_dir=str(cfg.out / STATE_DIR),
                                 resume=cfg.resume)
    adapter_bytes = {r: 4 * pkg.manifest.rank(r).trainable_parameters for r in pkg.ranks}
    emulation = Emulation(plan.devices, cfg.fraction, cfg.round_deadline, cfg.seed, adapter_bytes, cfg.fedavg_rank)
    server = FleetServer(server_config, emulation, evaluator, report, cfg.out, progress, cfg.eval_every)
    client = ClientPlan(str(pkg.path), str(cfg.out / DATA_DIR), tuple(d.rank or 0 for d in plan.devices),
                        cfg.backend, prep.threads, "cuda" if cfg.gpus_per_device > 0 else "cpu")
    backend_config = simulation_backend_config(cfg, prep.workers, local_gpus(cfg))
    progress.stage("starting the simulation engine" if cfg.ray_address is None
                   else f"joining the Ray cluster at {cfg.ray_address}")
    with _quiet_flower(), _worker_env(prep.threads):
        run_simulation(make_fleet_server_app(server), make_fleet_client_app(client), num_supernodes=cfg.devices,
                       backend_config=backend_config)
    if server.strategy is None or len(report.rounds) != cfg.rounds + 1:
        raise ConfigError(f"the simulation stopped after {max(len(report.rounds) - 1, 0)} of {cfg.rounds} rounds")
    return server


def _write_global(cfg: FleetConfig, server: Any, plan: FleetPlan, report: FleetReport) -> int:
    """``DIR/global/``: the final global adapter at the fleet's highest rank (the rank the method trained
    at most), at the package's scaling, as a PEFT directory naming its Hugging Face base model, with a model
    card holding the last evaluated round's metrics."""
    from lorafleet.export.formats.adapter import for_base_model, truncate, write_adapter
    from lorafleet.export.formats.hub import CardFacts, write_model_card
    from lorafleet.fleet.plan import ranked
    from lorafleet.fleet.report import shareable

    adapter = server.strategy.global_adapter
    r = min(adapter.r, max(ranked(plan.devices)))
    out = write_adapter(for_base_model(truncate(adapter, r), cfg.model), cfg.out / GLOBAL_DIR, overwrite=True)
    evaluated = [rec for rec in report.rounds if rec.metrics]
    metrics = {f"{k} (round {evaluated[-1].round})": v for k, v in evaluated[-1].metrics.items()} if evaluated else {}
    write_model_card(out, CardFacts(spec=cfg.model, method=cfg.method, rank=r, device_ranks=ranked(plan.devices),
                                    rounds=len(report.rounds) - 1, target_modules=sorted(cfg.target_modules),
                                    lora_alpha=cfg.lora_alpha, metrics=metrics))
    for path in (out, *out.iterdir()):
        shareable(path)
    return r


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower logs every message at INFO and warns that ``run_simulation`` is deprecated: errors only."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _worker_env(threads: int) -> Iterator[None]:
    """The environment Ray's workers inherit: ``threads`` OpenMP threads that sleep when idle (spinning
    threads are descheduled on a shared host; see ``lorafleet.federation.flower_env``), no telemetry."""
    wanted = {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "FLWR_TELEMETRY_ENABLED": "0",
              "TOKENIZERS_PARALLELISM": "false", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
