"""The edge-package compiler: load the foundation model, attach LoRA, wrap the loss, compile the ONNX Runtime
and ExecuTorch programs (side by side in :mod:`lorafleet.export.compiler.onnx` and
:mod:`lorafleet.export.compiler.executorch`), verify them against eager PEFT, estimate their cost, and write
the package (:mod:`lorafleet.export.compiler.pipeline` runs the stages)."""
