"""lorafleet: federated LoRA fine-tuning of on-device language models.

Everything installs under this one name. The libraries are ``lorafleet.export`` (the formats every layer
speaks, the edge-package compiler, the runtime sessions), ``lorafleet.edge_client`` (the device) and
``lorafleet.server`` (aggregation and the Flower strategy); this package's own modules orchestrate them:
the CLI (``lorafleet.commands``), emulated fleets (``lorafleet.fleet``) and real federations
(``lorafleet.federation``). The libraries never import the orchestration; docs/ARCHITECTURE.md has the map.
"""

__version__ = "0.1.0"
