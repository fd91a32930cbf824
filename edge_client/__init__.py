"""The on-device runtime: profiler and rank choice, local trainers (ExecuTorch, ONNX Runtime, torch),
HetLoRA rank self-pruning, and the Flower client. Uses ``export``'s formats; never imports ``server``."""
