"""lorafleet's base layer, in three roles: :mod:`~lorafleet.export.formats` (what every layer speaks: errors,
PEFT adapters, the protocol, the package manifest and layout), :mod:`~lorafleet.export.compiler` (the
edge-package compiler) and :mod:`~lorafleet.export.runtime` (sessions over the compiled programs).

Importing this package is cheap: nothing here imports torch, transformers, ExecuTorch or ONNX Runtime at
module level, so the server can use the adapter format without loading any runtime.
"""

from lorafleet.export.formats.errors import LorafleetError

__all__ = ["LorafleetError"]
