"""The graph rewrites of export.executorch.passes: each changes the graph as its docstring says and leaves
what the program computes unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import export

from export.executorch.passes import cancel_transpose_pairs, mm_to_linear, replace_empty_permuted

pytestmark = pytest.mark.filterwarnings("ignore")


def targets(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


class DoubleTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.permute(1, 0).permute(1, 0) + x.permute(1, 0).sum()


def test_cancel_transpose_pairs_keeps_results():
    torch.manual_seed(0)
    m, x = DoubleTranspose(), torch.randn(4, 3)
    ep = export(m, (x,))
    assert targets(ep).count(torch.ops.aten.permute.default) == 3
    assert cancel_transpose_pairs(ep) == 1
    assert targets(ep).count(torch.ops.aten.permute.default) == 1  # the lone transpose of x stays
    assert torch.allclose(ep.module()(x), m(x))
    assert cancel_transpose_pairs(ep) == 0


def test_mm_to_linear_restores_linear_on_constant_weights_only():
    torch.manual_seed(0)
    m, x = nn.Linear(6, 4, bias=False), torch.randn(5, 6)
    ep = export(m, (x,)).run_decompositions()
    assert torch.ops.aten.linear.default not in targets(ep)
    assert torch.ops.aten.mm.default in targets(ep)
    assert mm_to_linear(ep) == 1
    assert targets(ep) == [torch.ops.aten.linear.default]
    assert torch.allclose(ep.module()(x), m(x))

    class Activations(nn.Module):  # a transposed activation is not a weight: untouched
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b.permute(1, 0)

    ep2 = export(Activations(), (torch.randn(2, 3), torch.randn(4, 3)))
    assert mm_to_linear(ep2) == 0


def test_replace_empty_permuted():
    class Empty(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            buf = torch.empty_permuted((2, 3, 4), (2, 0, 1))
            return buf.copy_(x) * 2

    x = torch.randn(2, 3, 4)
    ep = export(Empty(), (x,))
    assert torch.ops.aten.empty_permuted.default in targets(ep)
    assert replace_empty_permuted(ep) == 1
    assert torch.ops.aten.empty_permuted.default not in targets(ep)
    assert torch.ops.aten.permute.default in targets(ep)
    out = ep.module()(x)
    assert out.shape == (2, 3, 4) and torch.equal(out, x * 2)
