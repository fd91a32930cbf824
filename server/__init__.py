"""The server: heterogeneous-rank aggregation as pure functions, the Flower strategy and ServerApp around
them, checkpoints, and validation of client updates. Uses ``export``'s formats; never imports
``edge_client``, and never needs ExecuTorch, ONNX Runtime or the model."""
