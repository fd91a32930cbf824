"""The graph rewrites of lorafleet.export.compiler.executorch.passes: each changes the graph as its docstring says and
leaves what the program computes unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import export

from lorafleet.export.compiler.executorch.passes import cancel_transpose_pairs, mm_to_linear, replace_empty_permuted

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


def test_unshare_constants_gives_each_user_its_own_placeholder():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))
            self.pinned = nn.Parameter(torch.randn(6, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.linear(x, self.w)  # (N, 4)
            return y @ self.w + (x @ self.pinned) @ self.pinned  # w and pinned each read twice

    from lorafleet.export.compiler.executorch.passes import unshare_constants

    torch.manual_seed(0)
    m, x = Shared(), torch.randn(3, 6)
    ep = export(m, (x,))
    keep = {ph for ph, fqn in ep.graph_signature.inputs_to_parameters.items() if fqn == "pinned"}
    assert unshare_constants(ep, keep_inside=keep) == 1
    w_placeholders = [ph for ph, fqn in ep.graph_signature.inputs_to_parameters.items() if fqn == "w"]
    assert len(w_placeholders) == 2  # same fqn (same bytes in the data file), one placeholder per user
    assert all(len(n.users) == 1 for n in ep.graph.nodes if n.name in w_placeholders)
    assert torch.allclose(ep.module()(x), m(x))


def test_drop_identity_ops_removes_copies_that_change_nothing():
    class Identities(nn.Module):
        def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = torch.ops.aten.alias.default(x)
            p1 = torch.pow(a, 1.0)                    # removed
            p2 = torch.pow(x, 2.0)                    # a real square: kept
            e = x.expand(2, 3, 4)                     # same shape: removed
            wide = x[:, :1].expand(2, 3, 4)           # a broadcast: kept
            t = x.permute(0, 1, 2)                    # identity permutation: removed
            s = x.permute(0, 2, 1)                    # a real transpose: kept
            return p1 * g + p2 + e + wide + t, torch.ops.aten.alias.default(s)  # an output alias is kept

    from lorafleet.export.compiler.executorch.passes import drop_identity_ops

    torch.manual_seed(0)
    x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ep = export(Identities(), (x, g))
    before = targets(ep)
    assert drop_identity_ops(ep) == 4
    after = targets(ep)
    aten = torch.ops.aten
    assert after.count(aten.pow.Tensor_Scalar) == 1 and before.count(aten.pow.Tensor_Scalar) == 2
    assert after.count(aten.expand.default) == 1 and after.count(aten.permute.default) == 1
    assert after.count(aten.alias.default) == 1  # the one returned
    for got, want in zip(ep.module()(x, g), Identities()(x, g), strict=True):
        assert torch.allclose(got, want)
    assert drop_identity_ops(ep) == 0


def test_sort_in_place_orders_a_graph_without_rebuilding_it():
    from lorafleet.export.compiler.executorch.partition import sort_in_place

    class Chain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x + 1
            b = a * 2
            c = b - a
            return c.sum()

    gm = torch.fx.symbolic_trace(Chain())
    graph = gm.graph
    assert sort_in_place(graph) == 0  # already ordered: nothing moves
    nodes = {n.name: n for n in graph.nodes}
    held = nodes["mul"]
    nodes["add"].append(nodes["sub"])  # sub now sits before mul, one of its inputs
    nodes["x"].append(nodes["mul"])  # and mul before add, its input
    with pytest.raises(RuntimeError):
        graph.lint()
    assert sort_in_place(graph) > 0
    graph.lint()
    assert held.graph is graph and held in list(graph.nodes)  # the same node objects, in the same graph
    gm.recompile()
    x = torch.randn(3)
    assert torch.allclose(gm(x), Chain()(x))


def test_contiguous_partitions_are_maximal_runs_and_never_split_a_group():
    from lorafleet.export.compiler.executorch.partition import contiguous_partitions

    class Mixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x + 1          # supported
            b = a * 2          # supported
            c = torch.cumsum(b, 0)  # not supported: ends the run
            d = c - 1          # supported
            e = d * 3          # supported, but grouped with f across the unsupported g
            g = torch.cumsum(e, 0)
            f = g + e
            return f

    gm = torch.fx.symbolic_trace(Mixed())
    nodes = {n.name: n for n in gm.graph.nodes}
    groups = [[nodes["add"]], [nodes["mul"]], [nodes["sub"]], [nodes["mul_1"], nodes["add_1"]]]
    parts = contiguous_partitions(gm.graph, groups)
    got = sorted(sorted(n.name for n in p.nodes) for p in parts)
    assert got == [["add", "mul"], ["sub"]]  # the group spanning cumsum is dropped, sub stays alone
    # an op's placeholder joins its op's partition
    groups2 = [[nodes["add"], nodes["x"]], [nodes["mul"]]]
    parts2 = contiguous_partitions(gm.graph, groups2)
    assert [sorted(n.name for n in p.nodes) for p in parts2] == [["add", "mul", "x"]]
