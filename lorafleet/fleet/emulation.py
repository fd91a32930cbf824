"""The emulated fleet's clock and calendar: pure functions of seeds, profiles and measurements.

How an emulated device behaves (the FedScale recipe, Lai et al., ICML 2022: measured compute scaled to the
device, transfer time from its bandwidth, availability, a round deadline that drops stragglers):

* **profiles** — each of ``N`` devices is given a profile from the fleet's mix: exact proportions by
  largest remainder, then a seeded shuffle (so 8 devices of 4 equally weighted profiles are 2 of each);
* **availability** — in round ``t`` device ``d`` is online with its profile's ``availability``, independently
  per round (a seeded Bernoulli draw); offline devices are not sampled;
* **sampling** — the server samples ``round(fraction · N)`` devices (at least one) uniformly from the online
  ones, or all of them when fewer are online;
* **ranks** — by default each profile's rank is the profiler's rule applied to it; or every device draws its
  rank from one of the FlexLoRA paper's distributions over the packaged ranks (:func:`draw_ranks`);
* **round time** — ``local steps × the device's step time`` plus receiving and sending the adapter over the
  profile's network (:func:`lorafleet.edge_client.rank_choice.transfer_seconds` uses the same formula to
  predict it when the device picks its rank). The step time is, by default (``flops`` emulation), the
  step's FLOPs (the manifest's estimate for the rank) over the profile's sustained GFLOP/s times
  :data:`TRAINING_EFFICIENCY` — the same on any host at any load (:func:`flops_step_seconds`); with
  ``measured`` emulation it is the host's measured training seconds × host GFLOP/s / device GFLOP/s, which
  carries the host's load into the emulation;
* **stragglers** — with a deadline, a device whose round time exceeds it is dropped (its update is not
  aggregated) and the round lasts until the deadline; without stragglers it lasts until the slowest
  participant finishes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from lorafleet.export.formats.errors import ConfigError

_ONLINE, _SAMPLE, _PROFILES, _RANKS = 0x0A11, 0x5A3F, 0x9F0F, 0x4A4B  # stream tags: independent draws, one seed

# Achieved training FLOP/s as a share of the profile's sustained matmul GFLOP/s: an eager SmolLM2-135M LoRA
# step against the same CPU's matmuls at the model's shapes, both in thread CPU seconds (bench/emulation_efficiency.py;
# 0.51-0.68 over three runs, docs/BENCHMARKS.md "Load-independent emulation")
TRAINING_EFFICIENCY = 0.6
HEAVY_TAIL_SHARE = 0.85  # FlexLoRA's heavy-tail distributions: this share of clients at one end of the ranks


def flops_step_seconds(flops_per_step: int, gflops: float, efficiency: float = TRAINING_EFFICIENCY) -> float:
    """One training step on a device of ``gflops`` sustained GFLOP/s: ``flops / (gflops · 1e9 · efficiency)``."""
    if flops_per_step < 0 or not (math.isfinite(gflops) and gflops > 0) or not (0 < efficiency <= 1):
        raise ConfigError(f"need flops_per_step >= 0, gflops > 0 and efficiency in (0, 1], got {flops_per_step}, "
                          f"{gflops}, {efficiency}")
    return flops_per_step / (gflops * 1e9 * efficiency)


def rank_weights(ranks: Sequence[int], distribution: str) -> dict[int, float]:
    """The probability of each packaged rank under one of the FlexLoRA paper's client distributions (Bai et
    al. 2024, arXiv:2402.11505, §5 and its code's ``--aggregation``), over the ranks in ascending order:

    * ``uniform`` — every rank equally likely;
    * ``heavy-tail-light`` — 85 % of the devices at the smallest rank, the rest uniform over the others
      (most devices are weak);
    * ``heavy-tail-strong`` — 85 % at the largest rank, the rest uniform over the others;
    * ``normal`` — a discretized normal over the rank indices, centred between the smallest and the largest,
      standard deviation a quarter of the index range (at least one index).
    """
    rs = sorted(set(int(r) for r in ranks))
    if not rs or rs[0] <= 0:
        raise ConfigError(f"ranks must be positive integers, got {list(ranks)}")
    if distribution not in ("uniform", "heavy-tail-light", "heavy-tail-strong", "normal"):
        raise ConfigError(f"unknown rank distribution {distribution!r} (known: uniform, heavy-tail-light, "
                          f"heavy-tail-strong, normal)")
    m = len(rs)
    if distribution == "uniform" or m == 1:
        w = [1.0] * m
    elif distribution in ("heavy-tail-light", "heavy-tail-strong"):
        end = 0 if distribution == "heavy-tail-light" else m - 1
        w = [HEAVY_TAIL_SHARE if i == end else (1 - HEAVY_TAIL_SHARE) / (m - 1) for i in range(m)]
    else:  # normal
        centre, sigma = (m - 1) / 2, max((m - 1) / 4, 1.0)
        w = [math.exp(-0.5 * ((i - centre) / sigma) ** 2) for i in range(m)]
    total = sum(w)
    return {r: x / total for r, x in zip(rs, w, strict=True)}


def draw_ranks(num_devices: int, ranks: Sequence[int], distribution: str, seed: int) -> list[int]:
    """One rank per device from :func:`rank_weights`: exact proportions by largest remainder (as
    :func:`assign_profiles` does), then a seeded shuffle, so small fleets show the distribution too."""
    weights = rank_weights(ranks, distribution)
    drawn = assign_profiles(num_devices, {str(r): w for r, w in weights.items()}, seed ^ _RANKS)
    return [int(r) for r in drawn]


def assign_profiles(num_devices: int, mix: Mapping[str, float], seed: int) -> list[str]:
    """One profile name per device, in the mix's proportions (largest remainder), seeded shuffle."""
    if num_devices <= 0:
        raise ConfigError(f"num_devices must be positive, got {num_devices}")
    names = sorted(mix)
    weights = np.array([float(mix[n]) for n in names])
    if not len(names) or (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ConfigError(f"the profile mix needs non-negative weights with a positive sum, got {dict(mix)}")
    quota = weights / weights.sum() * num_devices
    counts = np.floor(quota).astype(int)
    short = num_devices - int(counts.sum())
    order = sorted(range(len(names)), key=lambda i: (-(quota[i] - counts[i]), names[i]))
    for i in order[:short]:
        counts[i] += 1
    devices = [n for n, c in zip(names, counts, strict=True) for _ in range(int(c))]
    np.random.default_rng([seed, _PROFILES]).shuffle(devices)
    return devices


def online_mask(availability: Sequence[float], round_: int, seed: int) -> np.ndarray:
    """Which devices are online in ``round_`` (bool array): device ``d`` with probability ``availability[d]``."""
    p = np.asarray(availability, dtype=np.float64)
    if ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise ConfigError("availability must lie in [0, 1]")
    return np.random.default_rng([seed, round_, _ONLINE]).random(len(p)) < p


def sample_size(num_devices: int, fraction: float) -> int:
    """Devices the server asks for each round: ``round(fraction · N)``, at least one."""
    if not (0 < fraction <= 1):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * num_devices))


def sample_devices(online: np.ndarray, fraction: float, round_: int, seed: int) -> list[int]:
    """Sorted device indices sampled in ``round_`` from the online ones (all of them if too few are online)."""
    candidates = np.flatnonzero(online)
    k = min(sample_size(len(online), fraction), len(candidates))
    if k == 0:
        return []
    rng = np.random.default_rng([seed, round_, _SAMPLE])
    return sorted(int(d) for d in rng.choice(candidates, size=k, replace=False))


def round_seconds(host_train_seconds: float, time_scale: float, adapter_bytes: int, down_mbps: float,
                  up_mbps: float) -> float:
    """A device's emulated round: its training (host seconds × time scale) plus the adapter down and up."""
    for name, value in (("host_train_seconds", host_train_seconds), ("time_scale", time_scale)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a non-negative number, got {value}")
    if adapter_bytes < 0 or not (down_mbps > 0 and up_mbps > 0):
        raise ConfigError(f"need adapter_bytes >= 0 and positive bandwidths, got {adapter_bytes}, "
                          f"{down_mbps}, {up_mbps}")
    transfer = adapter_bytes * 8 / (down_mbps * 1e6) + adapter_bytes * 8 / (up_mbps * 1e6)
    return host_train_seconds * time_scale + transfer


def split_stragglers(times: Mapping[int, float], deadline: float | None) -> tuple[list[int], list[int]]:
    """``(on_time, late)`` device ids: late ones took longer than ``deadline`` (none without a deadline)."""
    late = sorted(d for d, t in times.items() if deadline is not None and t > deadline)
    return sorted(set(times) - set(late)), late


def round_duration(on_time_seconds: Sequence[float], deadline: float | None, any_late: bool) -> float:
    """How long the round lasted: until the deadline if someone straggled, else until the last finished."""
    if any_late and deadline is not None:
        return float(deadline)
    return float(max(on_time_seconds, default=0.0))
