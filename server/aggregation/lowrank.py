"""The rank-R truncated SVD of a sum of low-rank products, W = Σ_k L_k R_k, without forming W when possible.

L_k is (out, r_k) and R_k is (r_k, in); stacked, W = P Q with P = [L_1 … L_K] (out, K) and Q = [R_1; …; R_K]
(K, in), K = Σ r_k. The result is returned as LoRA factors ordered by singular value:

    B = U_R · diag(S_R)   (out, R),     A = V_Rᵀ   (R, in),     B @ A = the rank-R truncated SVD of W,

so the first r components of (B, A) are the rank-r truncated SVD of W for every r ≤ R. Each component's sign
is fixed (the largest-magnitude entry of its row of A is positive), so the factors do not depend on client
order or solver beyond rounding (beyond the certified tolerance for ``krylov``).

Solvers:

* ``factored`` (used while K ≤ min(out, in)): thin QR of both stacks, P = Q_P R_P and Qᵀ = Q_Q R_Q, so
  W = Q_P (R_P R_Qᵀ) Q_Qᵀ and the SVD of the small K×K core gives V = Q_Q V_c and U S = W V = P R_Qᵀ V_c
  (so Q_P of the longer side is never formed: only its R). Cost O((out + in) K² + K³); W (out × in) is
  never formed and no full-size SVD is taken.
* ``krylov`` (used when K > min(out, in), where the stacks have no low-rank factorization to exploit): the
  top R triplets by block Krylov iteration on the factored operator W x = P (Q x), never forming W
  (:mod:`lorafleet.server.aggregation.krylov`), accepted only with a certified residual ‖Wᵀ U − V S‖_F ≤ tol · σ_1;
  when it does not converge within its budget the exact ``gram`` path below is taken instead.
* ``gram`` (the exact path beyond min(out, in)): W is formed once by one GEMM, then the top R eigenpairs of
  the smaller Gram matrix (WᵀW or WWᵀ, min(out, in) square) in float64 give the singular vectors (LAPACK
  ``dsyevr`` with an index range: only R eigenvectors are computed). A direct method, not an iterative one,
  so it is exact to rounding: in float64 the squared singular values keep ~16 digits relative to σ_1², so
  components down to ~1e-6·σ_1 are resolved far below the float32 result's own rounding.

A wide W (out < in) is solved as Wᵀ = Qᵀ Pᵀ and transposed back. Everything after the stacking is float64
(the Gram path's single GEMM runs in the adapters' precision); callers cast the factors back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal

from lorafleet.export.formats.errors import AggregationError
from lorafleet.server.aggregation.krylov import KrylovSettings, top_singular

if TYPE_CHECKING:
    import torch

Solver = Literal["auto", "factored", "krylov", "gram"]
SOLVERS = ("auto", "factored", "krylov", "gram")


def truncated_svd_of_sum(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor], rank: int, *,
                         solver: Solver = "auto", krylov: KrylovSettings | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with B @ A the rank-``rank`` truncated SVD of Σ lefts[k] @ rights[k] (float64).

    Components beyond the stacked rank K are zero (B column and A row), so the shapes are always
    (out, rank) and (rank, in). ``krylov`` tunes the Krylov solver (default :class:`KrylovSettings`()).
    """
    import torch

    if solver not in SOLVERS:
        raise AggregationError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    p = torch.cat(list(lefts), dim=1)  # (out, K)
    q = torch.cat(list(rights), dim=0)  # (K, in)
    (out, k), inp = p.shape, q.shape[1]
    if solver == "auto":
        solver = "factored" if k <= min(out, inp) else "krylov"
    solvers: dict[str, Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
        "factored": _factored, "gram": _gram, "krylov": partial(_krylov_or_gram, settings=krylov or KrylovSettings())}
    solve = solvers[solver]
    if out >= inp:
        b, a = solve(p, q, min(rank, k, inp))
    else:  # work on Wᵀ = Qᵀ Pᵀ, which is tall, and transpose the answer back
        b, a = _transposed(*solve(q.T, p.T, min(rank, k, out)))
    return _pad(*_canonical_signs(b, a), rank)


def _canonical_signs(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix each component's sign (an SVD leaves it free): the largest-magnitude entry of every row of A is
    positive. B @ A is unchanged; the factors no longer depend on client order or on the solver."""
    import torch

    if a.shape[0] == 0:
        return b, a
    pivot = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # (R,)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(a.dtype)
    return b * sign, a * sign[:, None]


def _factored(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W = P Q with out ≥ in. P = Q_P R_P (only R_P is computed), Qᵀ = Q_Q R_Q, so
    W = Q_P (R_P R_Qᵀ) Q_Qᵀ; with the core's SVD U_c S V_cᵀ, V_R = Q_Q V_c and U_R S_R = W V_R = P R_Qᵀ V_c."""
    import torch

    p, q = p.to(torch.float64), q.to(torch.float64)
    r_p = torch.linalg.qr(p, mode="r")[1]  # (K', K), K' = min(out, K)
    q_q, r_q = torch.linalg.qr(q.T)  # (in, K''), (K'', K)
    vh = torch.linalg.svd(r_p @ r_q.T)[2]  # core (K', K''): only V_c is needed
    v = vh[:rank].T  # (K'', R)
    return p @ (r_q.T @ v), (q_q @ v).T  # B = U_R S_R (out, R), A = V_Rᵀ (R, in)


def _krylov_or_gram(p: torch.Tensor, q: torch.Tensor, rank: int, *,
                    settings: KrylovSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """W = P Q with out ≥ in: the certified Krylov triplets, or the exact Gram path when they are not."""
    import torch

    p64, q64 = p.to(torch.float64).numpy(), q.to(torch.float64).numpy()
    result = top_singular(p64, q64, rank, settings)
    if not result.converged:
        return _gram(p, q, rank)
    assert result.b is not None and result.a is not None
    return torch.from_numpy(result.b), torch.from_numpy(result.a)


def _gram(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W = P Q with out ≥ in, formed once; V_R = the top eigenvectors of WᵀW (in × in), U_R S_R = W V_R."""
    import scipy.linalg
    import torch

    wide = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
    w = (p.to(wide) @ q.to(wide)).to(torch.float64).numpy()  # (out, in): one GEMM in the adapters' precision
    gram = w.T @ w  # (in, in) in float64; numpy uses a SYRK here
    m = gram.shape[0]
    # Only the top `rank` eigenpairs (LAPACK dsyevr with an index range), then in descending order.
    _, vecs = scipy.linalg.eigh(gram, subset_by_index=[m - rank, m - 1], driver="evr")
    v = torch.from_numpy(vecs[:, ::-1].copy())  # (in, R), a fresh array: torch refuses negative strides
    return torch.from_numpy(w) @ v, v.T


def _transposed(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From Wᵀ ≈ b @ a with b = U'S (in, R) and a = V'ᵀ (R, out), the same convention for W = a.T @ b.T:
    B = V'S (out, R), A = U'ᵀ (R, in). Zero components stay zero."""
    import torch

    s = b.norm(dim=0)  # (R,) the singular values
    keep = s > 0
    return a.T * s, torch.where(keep[:, None], b.T / torch.where(keep, s, 1.0)[:, None], 0.0)


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return (torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
            torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0))
