"""lorafleet: federated LoRA fine-tuning of on-device language models.

This top package holds orchestration only (the CLI, fleet emulation, the demo). The libraries live in
``export`` (formats + edge-package compiler), ``edge_client`` (on-device runtime) and ``server``
(aggregation + Flower strategy); nothing below imports this package.
"""

__version__ = "0.1.0"
