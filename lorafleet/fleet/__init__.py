"""Emulated fleets: ``lorafleet fleet`` and ``lorafleet demo`` on Flower's simulation engine.

:mod:`~lorafleet.fleet.run` prepares and runs a fleet; :mod:`~lorafleet.fleet.config` is its configuration,
:mod:`~lorafleet.fleet.plan` the devices, :mod:`~lorafleet.fleet.server` / :mod:`~lorafleet.fleet.client` the
Flower apps, :mod:`~lorafleet.fleet.strategy` the emulation's strategy hooks, :mod:`~lorafleet.fleet.report` the
records and :mod:`~lorafleet.fleet.plots` their figures."""

from lorafleet.fleet.config import FleetConfig
from lorafleet.fleet.run import GLOBAL_DIR, FleetResult, make_evaluator, prepare, run_fleet

__all__ = ["GLOBAL_DIR", "FleetConfig", "FleetResult", "make_evaluator", "prepare", "run_fleet"]
