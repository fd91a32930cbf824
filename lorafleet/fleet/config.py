"""What an emulated fleet run takes: :class:`FleetConfig`, validated on construction, and ``--mix`` parsing.

The fields behind the ``lorafleet fleet`` options come first; the rest have defaults a library caller (the
demo, the benchmarks) may change. Every error names the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.edge_client.profiles import PROFILES_DIR
from lorafleet.export.formats.errors import ConfigError
from lorafleet.export.formats.quantization import Quantization

DATA_BUILTIN = "builtin"
BACKENDS = ("onnxruntime", "torch")  # emulation backends (the package's programs, or eager PEFT)
FEDAVG_RANKS = ("fleet-min", "fleet-max")
# how devices get their ranks: the profiler's rule on each profile, or drawn from the FlexLoRA paper's
# distributions over the packaged ranks (Bai et al. 2024, arXiv:2402.11505, §5: uniform, heavy-tail, normal)
RANK_DISTRIBUTIONS = ("profiler", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal")
# how a device's emulated step time is found: from the step's FLOPs and the profile's throughput (the same on
# any host, at any load), or measured on this host and scaled (the host's load shows in it)
EMULATIONS = ("flops", "measured")


def parse_mix(text: str) -> dict[str, float]:
    """``"pixel-8=2,jetson-orin-nano-8gb=1"`` → ``{"pixel-8": 2.0, "jetson-orin-nano-8gb": 1.0}``."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--mix: expected name=weight pairs separated by commas, got {item.strip()!r}")
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"--mix: weight of {name!r} must be a number, got {weight.strip()!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--mix: weight of {name!r} must be a non-negative number, got {weight.strip()!r}")
        if name in mix:
            raise ConfigError(f"--mix: profile {name!r} is given twice")
        mix[name] = value
    if sum(mix.values()) <= 0:
        raise ConfigError(f"--mix: the weights must not all be zero, got {text!r}")
    return mix


@dataclass(frozen=True)
class FleetConfig:
    """One emulated fleet run (see ``lorafleet fleet --help`` and README "Train an emulated fleet")."""

    devices: int
    rounds: int
    model: str
    method: str
    seed: int
    out: Path
    profiles_dir: Path = PROFILES_DIR
    mix: dict[str, float] | None = None  # None: every profile in profiles_dir, equal weights
    fraction: float = 1.0  # of the fleet, sampled each round among the online devices
    data: str = DATA_BUILTIN  # or a JSONL file
    local_steps: int = 10
    round_deadline: float | None = None  # emulated seconds; also the devices' time budget for their rank
    ranks: tuple[int, ...] = (4, 8, 16)  # the packaged ranks
    quantize: str = "none"  # the package's frozen base: none (fp32), int8, int4[:G] (as ``lorafleet export``)
    rank_distribution: str = "profiler"
    emulation: str = "flops"
    resume: bool = False  # continue the run in ``out`` from its last completed round (DIR/state/)
    gpus_per_device: float = 0.0  # a simulation worker's GPU share (Ray num_gpus); > 0: torch trains on CUDA
    ray_address: str | None = None  # join this running Ray cluster ("HOST:PORT", "auto") instead of starting one
    # --- library-only settings ---
    target_modules: tuple[str, ...] = ()  # (): the model family's (q_proj, v_proj; Phi-3: qkv_proj)
    lora_alpha: float = 16.0
    seq_len: int = 0  # 0: the smallest multiple of 32 that holds the longest training example (≤ 512)
    lr: float = 1e-3
    examples_per_device: int = 32  # built-in data
    dirichlet_alpha: float = 0.5  # built-in data: family mixture per device (small: few families each)
    eval_per_family: int = 2
    eval_max_new_tokens: int = 16
    eval_every: int = 1  # evaluate the baseline, the last round and every k-th round (0: those two only)
    backend: str = "torch"  # see lorafleet.fleet: why not the package's ONNX Runtime programs by default
    memory_fraction: float = 0.9
    workers: int = 0  # simulation workers (Ray actors); 0: one per usable CPU
    fedavg_rank: str = "fleet-min"  # fedavg trains one rank: the fleet's smallest, or its largest (a bound)
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the report's config, nothing else

    def __post_init__(self) -> None:
        from lorafleet.server.aggregation import METHODS

        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "profiles_dir", Path(self.profiles_dir))
        object.__setattr__(self, "ranks", tuple(sorted(self.ranks)))
        if not isinstance(self.quantize, str):
            raise ConfigError(f"quantize must be none, int8, int4 or int4:G, got {self.quantize!r}")
        object.__setattr__(self, "quantize", str(Quantization.parse(self.quantize)))  # int4 -> int4:32
        if not self.target_modules:
            from lorafleet.export.compiler.models import default_targets

            object.__setattr__(self, "target_modules", default_targets(self.model))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("devices", "rounds", "local_steps", "examples_per_device", "eval_per_family",
                     "eval_max_new_tokens"):
            _positive_int(name, getattr(self, name))
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (isinstance(self.fraction, int | float) and 0 < self.fraction <= 1):
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.round_deadline is not None and not (math.isfinite(self.round_deadline) and self.round_deadline > 0):
            raise ConfigError(f"round_deadline must be a positive number of seconds, got {self.round_deadline}")
        if not self.ranks or any(not isinstance(r, int) or r <= 0 for r in self.ranks) or \
                len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"ranks must be distinct positive integers, got {list(self.ranks)}")
        if self.seq_len != 0 and not (isinstance(self.seq_len, int) and self.seq_len >= 8):
            raise ConfigError(f"seq_len must be 0 (from the data) or at least 8, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (self.dirichlet_alpha > 0):
            raise ConfigError(f"dirichlet_alpha must be positive (inf: IID), got {self.dirichlet_alpha}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not (0 < self.memory_fraction <= 1):
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"eval_every must be 0 (baseline and last round) or positive, got {self.eval_every}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (one per CPU) or positive, got {self.workers}")
        if self.rank_distribution not in RANK_DISTRIBUTIONS:
            raise ConfigError(f"rank_distribution must be one of {', '.join(RANK_DISTRIBUTIONS)}, "
                              f"got {self.rank_distribution!r}")
        if self.emulation not in EMULATIONS:
            raise ConfigError(f"emulation must be one of {', '.join(EMULATIONS)}, got {self.emulation!r}")
        if isinstance(self.gpus_per_device, bool) or not isinstance(self.gpus_per_device, int | float) or \
                not (0 <= self.gpus_per_device <= 1):
            raise ConfigError(f"gpus_per_device must be a GPU share in [0, 1] (0: train on the CPU), "
                              f"got {self.gpus_per_device!r}")
        if self.gpus_per_device > 0 and self.backend != "torch":
            raise ConfigError(f"gpus_per_device needs the torch backend (the {self.backend} programs run on the "
                              "CPU), got backend {self.backend!r}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()
                                             or any(c.isspace() for c in self.ray_address)):
            raise ConfigError(f"ray_address must be a Ray cluster address (HOST:PORT, ray://HOST:PORT or auto), "
                              f"got {self.ray_address!r}")
        if self.fedavg_rank not in FEDAVG_RANKS:
            raise ConfigError(f"fedavg_rank must be one of {', '.join(FEDAVG_RANKS)}, got {self.fedavg_rank!r}")
        self.check_inputs()

    def check_inputs(self) -> None:
        """The user's paths: the profiles directory and a JSONL file (when not built-in)."""
        if not self.profiles_dir.is_dir():
            raise ConfigError(f"profiles directory not found: {self.profiles_dir}")
        if self.data != DATA_BUILTIN and not Path(self.data).is_file():
            raise ConfigError(f"data must be 'builtin' or a JSONL file; not found: {self.data}")

    def to_json(self) -> dict[str, Any]:
        """The report's ``config``: every setting, paths as strings."""
        d = asdict(self)
        extra = d.pop("extra")
        d.pop("resume")  # how this run started, not what it is
        d.update(out=str(self.out), profiles_dir=str(self.profiles_dir), ranks=list(self.ranks),
                 target_modules=list(self.target_modules), round_deadline_s=d.pop("round_deadline"))
        return {**d, **extra}


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
