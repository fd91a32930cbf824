"""The federation wire protocol (version 1) that the server and every device speak over Flower messages.

One place for the names both sides use — record names, config keys, metric keys — and for the conversion between an
:class:`lorafleet.export.formats.adapter.Adapter` and the named arrays a message carries. The byte-level format is
Flower's (an ``ArrayRecord`` of ``numpy.ndarray`` arrays serialized with ``numpy.save(allow_pickle=False)``);
``docs/federation-protocol.md`` describes every message exactly, for devices that do not run Python.

Array names are PEFT's saved keys, ``base_model.model.<module>.lora_A.weight`` (r × in) and
``...lora_B.weight`` (out × r), float32 on the way out. Every adapter on the wire is expressed at the
package's scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) for the rank ``r`` it carries,
so a device loads the tensors straight into its compiled program and the server reads them back unchanged.

This module imports neither Flower nor torch at import time (the server never needs the device runtimes,
and a device never needs the aggregation code).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.adapter import PEFT_PREFIX, adapter_from_state_dict, peft_config

if TYPE_CHECKING:
    import numpy as np

    from lorafleet.export.formats.adapter import Adapter

PROTOCOL_VERSION = 1

# Record names inside a message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: the adapter
CONFIG = "config"  # ConfigRecord: server → device instructions
METRICS = "metrics"  # MetricRecord: device → server report

# Server → device (ConfigRecord keys). A query carries PROTOCOL, ROUND_TIMEOUT and LOCAL_STEPS only.
PROTOCOL = "protocol"
SERVER_ROUND = "server-round"  # Flower's own key, set by FedAvg
NUM_ROUNDS = "num-rounds"  # the run's last round (optional: a device that sees it knows the run is ending)
RANK = "rank"  # the rank of the adapter sent; the device trains at this rank
METHOD = "method"
LORA_ALPHA = "lora-alpha"
USE_RSLORA = "use-rslora"
LOCAL_STEPS = "local-steps"
LEARNING_RATE = "lr"
BATCH_SIZE = "batch-size"  # 0: the package's compiled batch size
SEED = "seed"
SELF_PRUNE = "self-prune"  # HetLoRA rank self-pruning on the device (hetlora only)
PRUNE_GAMMA = "prune-gamma"
PRUNE_LAMBDA = "prune-lambda"  # the self-pruning penalty's λ (optional; devices default to 1.0)
ROUND_TIMEOUT = "round-timeout"  # seconds: the device's time budget for one local round

# Device → server (MetricRecord keys).
NUM_EXAMPLES = "num-examples"  # Flower's weighting key
LOSS = "loss"  # mean training loss of the round
TRAIN_SECONDS = "train-seconds"
TRAIN_REPLY_METRICS = frozenset({NUM_EXAMPLES, RANK, LOSS, TRAIN_SECONDS})
QUERY_REPLY_METRICS = frozenset({RANK})

FLOAT_DTYPES = ("float16", "float32", "float64")
NO_RANK = 0  # a query reply's rank when no packaged rank fits the device


def lora_key(module: str, which: str) -> str:
    """PEFT's saved key of ``module``'s ``lora_A`` or ``lora_B`` (``which`` is ``"A"`` or ``"B"``)."""
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def expected_shapes(module_shapes: Mapping[str, tuple[int, int]], r: int) -> dict[str, tuple[int, int]]:
    """Every array name of a rank-``r`` adapter → its shape: lora_A (r, in), lora_B (out, r)."""
    shapes: dict[str, tuple[int, int]] = {}
    for module, (out, inp) in sorted(module_shapes.items()):
        shapes[lora_key(module, "A")] = (r, inp)
        shapes[lora_key(module, "B")] = (out, r)
    return shapes


def adapter_arrays(adapter: Adapter) -> dict[str, np.ndarray]:
    """The adapter's factors as float32, C-contiguous numpy arrays under PEFT keys (the message content)."""
    import numpy as np

    return {key: np.ascontiguousarray(t.detach().cpu().float().numpy())
            for key, t in sorted(adapter.state_dict().items())}


def adapter_record(adapter: Adapter) -> Any:
    """The adapter as a Flower ``ArrayRecord`` (what a message carries under :data:`ARRAYS`)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(a) for key, a in adapter_arrays(adapter).items()})


def adapter_from_arrays(arrays: Mapping[str, np.ndarray], r: int, lora_alpha: float, *,
                        use_rslora: bool = False, target_modules: Iterable[str] | None = None,
                        origin: str = "message", check_finite: bool = True) -> Adapter:
    """A rank-``r`` adapter at scaling ``lora_alpha / r`` from message arrays (checked by
    :func:`lorafleet.export.formats.adapter.adapter_from_state_dict`: LoRA keys only, consistent shapes, float, and
    finite unless the caller already checked). float32 arrays are shared, not copied."""
    import numpy as np
    import torch

    tensors = {key: torch.from_numpy(np.require(a, np.float32, ["C", "W"])) for key, a in arrays.items()}
    targets = sorted(target_modules) if target_modules is not None else sorted(
        {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in arrays})
    config: dict[str, Any] = peft_config(targets, r, lora_alpha, use_rslora=use_rslora)
    return adapter_from_state_dict(tensors, config, origin=origin, check_finite=check_finite)
