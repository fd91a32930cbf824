"""ONNX Runtime's dequantization kernels on one weight of a 1B-class MLP (8192 × 2048), best of 5 runs each.

    .venv/bin/python bench/ort_dequantize.py

What :func:`lorafleet.export.compiler.onnx.graph.lean_dequantizations` chose between: int8 with one scale per
row as ``DequantizeLinear`` blocked (block = the row) or per axis, or ``Cast`` × scale; int4 nibbles (already
unpacked, uint8 0…15) with a scale per 32 inputs as a blocked ``DequantizeLinear`` (opset 21, zero point 8)
or a per-tensor ``DequantizeLinear`` (scale 1, zero point 8) followed by a ``Mul`` with the group scales.
Both int4 forms give the same bits (checked here). Two intra-op threads, as on the project's machine.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

R, C, G = 8192, 2048, 32


def session(nodes: list, inputs: list, inits: list) -> ort.InferenceSession:
    graph = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("w", T.FLOAT, [R, C])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def best_ms(sess: ort.InferenceSession, feed: dict) -> float:
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    feed8 = {"x": rng.integers(-128, 128, (R, C), dtype=np.int8), "s": rng.random((R, 1), dtype=np.float32)}
    in8 = [h.make_tensor_value_info("x", T.INT8, [R, C]), h.make_tensor_value_info("s", T.FLOAT, [R, 1])]
    blocked8 = session([h.make_node("DequantizeLinear", ["x", "s"], ["w"], axis=1, block_size=C)], in8, [])
    axis8 = session([h.make_node("Reshape", ["s", "rows"], ["s1"]),
                     h.make_node("DequantizeLinear", ["x", "s1"], ["w"], axis=0)], in8,
                    [h.make_tensor("rows", T.INT64, [1], [R])])
    cast8 = session([h.make_node("Cast", ["x"], ["xf"], to=T.FLOAT), h.make_node("Mul", ["xf", "s"], ["w"])], in8, [])
    print(f"int8: blocked {best_ms(blocked8, feed8):.1f} ms, per axis {best_ms(axis8, feed8):.1f} ms, "
          f"cast x scale {best_ms(cast8, feed8):.1f} ms")
    feed4 = {"x": rng.integers(0, 16, (R, C), dtype=np.uint8), "s": rng.random((R, C // G), dtype=np.float32)}
    in4 = [h.make_tensor_value_info("x", T.UINT8, [R, C]), h.make_tensor_value_info("s", T.FLOAT, [R, C // G])]
    eight = h.make_tensor("e8", T.UINT8, [], [8])
    blocked4 = session([h.make_node("Shape", ["s"], ["ss"]), h.make_node("Expand", ["e8", "ss"], ["zp"]),
                        h.make_node("DequantizeLinear", ["x", "s", "zp"], ["w"], axis=1, block_size=G)], in4, [eight])
    tensor4 = session([h.make_node("DequantizeLinear", ["x", "one", "e8"], ["v"]),
                       h.make_node("Reshape", ["v", "grouped"], ["v3"]), h.make_node("Unsqueeze", ["s", "ax"], ["s3"]),
                       h.make_node("Mul", ["v3", "s3"], ["w3"]), h.make_node("Reshape", ["w3", "flat"], ["w"])], in4,
                      [eight, h.make_tensor("one", T.FLOAT, [], [1.0]),
                       h.make_tensor("grouped", T.INT64, [3], [R, C // G, G]),
                       h.make_tensor("flat", T.INT64, [2], [R, C]), h.make_tensor("ax", T.INT64, [1], [-1])])
    same = bool((blocked4.run(None, feed4)[0] == tensor4.run(None, feed4)[0]).all())
    print(f"int4:{G}: blocked {best_ms(blocked4, feed4):.1f} ms, "
          f"per tensor + group Mul {best_ms(tensor4, feed4):.1f} ms (same bits: {same})")


if __name__ == "__main__":
    main()
