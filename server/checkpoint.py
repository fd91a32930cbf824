"""The server's state on disk — the one module that reads or writes it.

A state directory ``DIR`` holds::

    DIR/global/        the global adapter after the last completed round (a PEFT adapter directory)
    DIR/state.json     round, method, the configuration, each node's rank, and the per-round history
    DIR/flower/        Flower's own files (SuperLink database, FLWR_HOME) when ``lorafleet serve`` runs

It is written after every round so that a crash loses at most the round in progress, and a save is crash-safe
in any interleaving: the new adapter is first written complete to ``DIR/global.next/`` (temporary directory +
rename), then ``state.json`` is replaced atomically naming the sha256 of that adapter's weights, then
``global.next/`` replaces ``global/``. :meth:`Checkpoint.load` takes whichever of the two directories matches
the digest in ``state.json`` (finishing an interrupted swap), so state and adapter always agree.

Nothing saved is ever lost to a mistake: a new run refuses a directory that already holds a state or a global
adapter, ``--resume`` refuses a directory with nothing to resume, every field of ``state.json`` is checked
(type and range) when it is read, and a global adapter that is not finite is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from lorafleet.export.formats.adapter import WEIGHTS_FILE, for_base_model, read_adapter, write_adapter
from lorafleet.export.formats.atomic import atomic_write_text
from lorafleet.export.formats.errors import LorafleetError
from lorafleet.export.formats.hub import CardFacts, write_model_card
from lorafleet.export.formats.schema import Strict, validate

if TYPE_CHECKING:
    from lorafleet.export.formats.adapter import Adapter

STATE_FILE = "state.json"
GLOBAL_DIR = "global"
NEXT_DIR = "global.next"
FLOWER_DIR = "flower"
STATE_VERSION = 1


class CheckpointError(LorafleetError):
    """A state directory that is missing, inconsistent, or in the way of a new run."""


@dataclass
class ServerState:
    """What ``state.json`` holds (besides the adapter digest)."""

    method: str
    rounds: int  # the rounds the run was asked for
    round: int = 0  # rounds completed
    package: str = ""
    global_rank: int = 0
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the run's settings, for the record
    node_ranks: dict[str, int] = field(default_factory=dict)  # Flower node id -> current rank
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per completed round
    finished: bool = False
    version: int = STATE_VERSION

    def to_json(self, global_sha256: str) -> str:
        return json.dumps({**asdict(self), "global_sha256": global_sha256}, indent=2, sort_keys=True) + "\n"


class _StateFile(Strict):
    """``state.json`` as read from disk: every field typed and bounded."""

    version: int = Field(ge=STATE_VERSION, le=STATE_VERSION)
    method: str = Field(min_length=1, max_length=64)
    rounds: int = Field(ge=1, le=1_000_000)
    round: int = Field(ge=0, le=1_000_000)
    package: str = Field(max_length=4096)
    global_rank: int = Field(ge=0, le=1 << 20)
    seed: int = Field(ge=-(2**63), le=2**63 - 1)
    config: dict[str, Any]
    node_ranks: dict[str, int]
    history: list[dict[str, Any]]
    finished: bool
    global_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Checkpoint:
    """Reads and writes one state directory."""

    def __init__(self, directory: str | Path, *, base_model: str = ""):
        """``base_model``: the package's model spec; the global adapter then names its Hugging Face base model
        and gets a model card (:mod:`lorafleet.export.formats.hub`)."""
        self.dir = Path(directory)
        self.base_model = base_model

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def global_dir(self) -> Path:
        return self.dir / GLOBAL_DIR

    @property
    def flower_dir(self) -> Path:
        """Where Flower's own files live (SuperLink database, FLWR_HOME)."""
        return self.dir / FLOWER_DIR

    def exists(self) -> bool:
        return self.state_file.is_file()

    def check_new(self) -> None:
        """Refuse to start a fresh run over a saved one (``--resume`` continues it) or over any global adapter."""
        if self.exists():
            state = self._read_state()
            raise CheckpointError(f"{self.dir} already holds a run ({state.get('method')}, round "
                                  f"{state.get('round')} of {state.get('rounds')}): pass --resume to continue it, "
                                  f"or choose another --state directory")
        for leftover in (self.global_dir, self.dir / NEXT_DIR):
            if leftover.exists():
                raise CheckpointError(f"{self.dir} holds a global adapter ({leftover.name}/) but no {STATE_FILE}: "
                                      f"refusing to overwrite it; move it away or choose another --state directory")

    def check_resumable(self) -> None:
        """Refuse ``--resume`` of a directory that holds nothing to resume (and check what it holds)."""
        if not self.exists():
            raise CheckpointError(f"--resume: {self.dir} holds no {STATE_FILE}, so there is nothing to resume "
                                  f"(leave out --resume to start a new run in a new directory)")
        self.load()

    def save(self, state: ServerState, adapter: Adapter) -> None:
        """Persist ``state`` and the global ``adapter`` atomically (see the module docstring)."""
        from lorafleet.server.bounds import finite_adapter

        check = finite_adapter(adapter)
        if not check.finite:
            raise CheckpointError(f"refusing to save a global adapter that is not finite ({check.reason}); "
                                  f"{self.global_dir} keeps the last finite one")
        self.dir.mkdir(parents=True, exist_ok=True)
        nxt = self.dir / NEXT_DIR
        if self.base_model:
            adapter = for_base_model(adapter, self.base_model)
        write_adapter(adapter, nxt, overwrite=True)
        if self.base_model:
            write_model_card(nxt, card_facts(state, adapter, self.base_model))
        digest = _digest(nxt)
        assert digest is not None, f"{nxt} was just written"
        atomic_write_text(self.state_file, state.to_json(digest))
        _swap(nxt, self.global_dir)

    def load(self) -> tuple[ServerState, Adapter]:
        """The saved state and global adapter; raises :class:`CheckpointError` if they do not agree."""
        data = self._read_state()
        checked = validate(_StateFile, data, str(self.state_file), CheckpointError)
        if checked.round > checked.rounds or len(checked.history) != checked.round:
            raise CheckpointError(f"{self.state_file}: round {checked.round} of {checked.rounds} with "
                                  f"{len(checked.history)} history entries is inconsistent; the file was edited")
        if any(r < 0 for r in checked.node_ranks.values()):
            raise CheckpointError(f"{self.state_file}: node_ranks must be non-negative ranks")
        fields = checked.model_dump()
        digest = fields.pop("global_sha256")
        state = ServerState(**fields)
        nxt = self.dir / NEXT_DIR
        if _digest(self.global_dir) != digest:
            if _digest(nxt) != digest:
                raise CheckpointError(f"{self.dir}: neither {GLOBAL_DIR}/ nor {NEXT_DIR}/ matches the adapter "
                                      f"recorded in {STATE_FILE}; the state directory is damaged")
            _swap(nxt, self.global_dir)  # the previous save stopped between its last two steps
        return state, read_adapter(self.global_dir)

    def _read_state(self) -> dict[str, Any]:
        if not self.exists():
            raise CheckpointError(f"{self.dir} holds no {STATE_FILE} (nothing to resume)")
        try:
            data = json.loads(self.state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.state_file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise CheckpointError(f"{self.state_file} is not a lorafleet server state (version {STATE_VERSION})")
        return data


def card_facts(state: ServerState, adapter: Adapter, spec: str) -> CardFacts:
    """The model card of the global adapter after ``state``'s last round (its devices' mean training loss)."""
    last = state.history[-1] if state.history else {}
    metrics = {f"devices' mean training loss, round {state.round}": last["loss"]} if last.get("loss") else {}
    device_ranks = [r for r in state.node_ranks.values() if r] or [adapter.r]
    pair = next(iter(adapter.modules.values()))
    alpha = pair.scaling * (pair.r ** 0.5 if adapter.use_rslora else pair.r)
    return CardFacts(spec=spec, method=state.method, rank=adapter.r, device_ranks=device_ranks, rounds=state.round,
                     target_modules=sorted({n.rsplit(".", 1)[-1] for n in adapter.modules}), lora_alpha=alpha,
                     metrics=metrics)


def _digest(adapter_dir: Path) -> str | None:
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        return None
    h = hashlib.sha256(weights.read_bytes())
    h.update((adapter_dir / "adapter_config.json").read_bytes() if (adapter_dir / "adapter_config.json").is_file()
             else b"")
    return h.hexdigest()


def _swap(new: Path, target: Path) -> None:
    """Make ``new`` the directory ``target`` (two renames; ``load`` repairs a crash between them)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
