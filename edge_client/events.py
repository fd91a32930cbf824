"""What a device did, as data: one JSON line per message the ClientApp handled, for its owner.

The ClientApp runs in a fresh process per message (Flower's SuperExec starts it), so it cannot print to the
owner's terminal in order with anything else. It appends an event to the node's ``events`` file instead
(``NodeSettings.events``), and ``lorafleet client`` follows that file and renders each event as one line
(:func:`render`). Nothing parses the rendered line back; ``--exit-on-finish`` reads :attr:`RoundEvent.final`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RankEvent:
    """The node answered the server's query: it trains ``rank`` (``0``: no packaged rank fits)."""

    rank: int
    kind: str = "rank"


@dataclass(frozen=True)
class RoundEvent:
    """One local round: trained ``steps`` steps at ``rank``, the loss of the first and of the last step."""

    round: int
    num_rounds: int  # 0: the server did not say (an older server)
    rank: int
    steps: int
    loss_first: float
    loss_last: float
    seconds: float
    num_examples: int
    kind: str = "round"

    @property
    def final(self) -> bool:
        """The server said this is the run's last round."""
        return self.num_rounds > 0 and self.round >= self.num_rounds


Event = RankEvent | RoundEvent
_KINDS: dict[str, Any] = {"rank": RankEvent, "round": RoundEvent}


def append_event(path: str | Path, event: Event) -> None:
    """Append ``event`` as one JSON line (one ``write`` of a short line: whole lines, even if several
    ClientApp processes of this node append at once)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(event)) + "\n")


def read_events(path: str | Path, offset: int = 0) -> tuple[list[Event], int]:
    """The complete events from byte ``offset`` on, and the offset after the last complete line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events: list[Event] = []
    for line in data[:end].splitlines():
        record = json.loads(line)
        events.append(_KINDS[record.pop("kind")](**record))
    return events, offset + end


def render(event: Event) -> str:
    """The owner's line for ``event``."""
    if isinstance(event, RankEvent):
        if event.rank == 0:
            return "no packaged rank fits this device: it answers the server but does not train"
        return f"training at rank {event.rank}"
    of = f"/{event.num_rounds}" if event.num_rounds else ""
    return (f"round {event.round}{of}: rank {event.rank}, {event.steps} steps on {event.num_examples} examples, "
            f"loss {event.loss_first:.4f} → {event.loss_last:.4f}, {event.seconds:.1f} s")
