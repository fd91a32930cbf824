"""The ONNX Runtime half of the compiler: graph rewrites and the training artifacts of one rank."""
