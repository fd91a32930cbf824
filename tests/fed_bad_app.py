"""A misbehaving device for the deployment tests: a ClientApp that answers the rank query with rank 4 and then
sends one kind of bad update, chosen by its node config ``fault``.

A device can run any software it likes; the test runs this app in a SuperNode whose PYTHONPATH starts with a
generated ``sitecustomize.py`` that replaces ``lorafleet.edge_client.flower_client.app`` with this module's
``app`` in every Python process of that node, so the server's FAB resolves
``lorafleet.edge_client.flower_client:app`` to this app on that node only.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

FAULTS = ("nan", "shape", "rank", "keys", "examples")
app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"rank": 4})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    fault = str(context.node_config["fault"])
    arrays = {k: a.numpy().copy() for k, a in message.content["arrays"].items()}
    key = sorted(arrays)[0]
    metrics = {"num-examples": 10, "rank": int(message.content["config"]["rank"])}
    if fault == "nan":  # NaN values
        arrays[key][0, 0] = np.nan
    elif fault == "shape":  # wrong shapes
        arrays[key] = np.zeros((arrays[key].shape[0], 3), np.float32)
    elif fault == "rank":  # a rank it was not given
        arrays = {k: np.concatenate([v, v], axis=0 if ".lora_A." in k else 1) for k, v in arrays.items()}
        metrics["rank"] *= 2
    elif fault == "keys":  # extra keys
        arrays["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    elif fault == "examples":  # negative example count
        metrics["num-examples"] = -5
    else:
        raise ValueError(f"unknown fault {fault!r}")
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=message)


def shadow_package(directory):
    """Write ``directory/sitecustomize.py`` swapping lorafleet's ClientApp for this one; put ``directory`` first
    on the bad node's PYTHONPATH (with tests/ after it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        '"""A misbehaving device\'s own software (tests only): lorafleet\'s ClientApp replaced."""\n'
        "import lorafleet.edge_client.flower_client as _real\n"
        "from fed_bad_app import app as _bad\n\n"
        "_real.app = _bad\n")
    return directory
