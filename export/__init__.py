"""lorafleet's base layer: shared formats (errors, PEFT adapters, model specs, package manifest) and
the edge-package compile pipeline.

Importing this package is cheap: nothing here imports torch, transformers, ExecuTorch or ONNX Runtime at
module level, so the server can use the adapter format without loading any runtime.
"""

from export.errors import LorafleetError

__all__ = ["LorafleetError"]
