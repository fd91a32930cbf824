"""Runtime sessions over a package's compiled programs, shared by devices and by export's verification:
:mod:`lorafleet.export.runtime.onnx` (ONNX Runtime training) and :mod:`lorafleet.export.runtime.executorch`
(ExecuTorch inference and training programs). They import formats only, never the compiler."""
