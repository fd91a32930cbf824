"""The rank-R truncated SVD of a sum of low-rank products, W = Σ_k L_k R_k, without forming W when possible.

L_k is (out, r_k) and R_k is (r_k, in); stacked, W = P Q with P = [L_1 … L_K] (out, K) and Q = [R_1; …; R_K]
(K, in), K = Σ r_k. The result is returned as LoRA factors ordered by singular value:

    B = U_R · diag(S_R)   (out, R),     A = V_Rᵀ   (R, in),     B @ A = the rank-R truncated SVD of W,

so the first r components of (B, A) are the rank-r truncated SVD of W for every r ≤ R.

Solvers:

* ``factored`` (used while K ≤ min(out, in)): thin QR of both stacks, P = Q_P R_P and Qᵀ = Q_Q R_Q, so
  W = Q_P (R_P R_Qᵀ) Q_Qᵀ and the SVD of the small K×K core gives U = Q_P U_c, V = Q_Q V_c. Cost
  O((out + in) K² + K³); W (out × in) is never formed and no full-size SVD is taken.
* ``gram`` (used when K > min(out, in), where W has no low-rank factorization to exploit): W is formed once
  by one GEMM, then the top R eigenpairs of the smaller Gram matrix (WᵀW or WWᵀ, min(out, in) square) in
  float64 give the singular vectors (LAPACK ``dsyevr`` with an index range: only R eigenvectors are
  computed). A direct method, not an iterative one, so it is exact to rounding: in float64 the squared
  singular values keep ~16 digits relative to σ_1², so components down to ~1e-6·σ_1 are resolved far below
  the float32 result's own rounding.

Everything after the stacking is float64; callers cast the factors back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from export.errors import AggregationError

if TYPE_CHECKING:
    import torch

Solver = Literal["auto", "factored", "gram"]
SOLVERS = ("auto", "factored", "gram")


def truncated_svd_of_sum(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor], rank: int, *,
                         solver: Solver = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with B @ A the rank-``rank`` truncated SVD of Σ lefts[k] @ rights[k] (float64).

    Components beyond the stacked rank K are zero (B column and A row), so the shapes are always
    (out, rank) and (rank, in).
    """
    if solver not in SOLVERS:
        raise AggregationError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    out, inp = lefts[0].shape[0], rights[0].shape[1]
    k = sum(int(x.shape[1]) for x in lefts)
    if solver == "factored" or (solver == "auto" and k <= min(out, inp)):
        b, a = _factored(lefts, rights, min(rank, k))
    else:
        b, a = _gram(lefts, rights, min(rank, k))
    return _pad(b, a, rank)


def _factored(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor],
              rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    p = torch.cat([x.to(torch.float64) for x in lefts], dim=1)  # (out, K)
    qt = torch.cat([x.to(torch.float64) for x in rights], dim=0).T  # (in, K)
    q_p, r_p = torch.linalg.qr(p)  # (out, K'), (K', K) with K' = min(out, K)
    q_q, r_q = torch.linalg.qr(qt)  # (in, K''), (K'', K)
    u, s, vh = torch.linalg.svd(r_p @ r_q.T)  # core (K', K'')
    b = q_p @ (u[:, :rank] * s[:rank])  # (out, R) = U_R S_R
    a = vh[:rank] @ q_q.T  # (R, in) = V_Rᵀ
    return b, a


def _gram(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor],
          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.linalg
    import torch

    wide = torch.promote_types(torch.promote_types(lefts[0].dtype, rights[0].dtype), torch.float32)
    w = (torch.cat([x.to(wide) for x in lefts], dim=1) @ torch.cat([x.to(wide) for x in rights], dim=0))
    w64 = w.to(torch.float64).numpy()  # (out, in), one GEMM in the adapters' precision, the rest in float64
    del w
    tall = w64.shape[1] <= w64.shape[0]
    gram = w64.T @ w64 if tall else w64 @ w64.T  # (m, m), m = min(out, in); numpy uses a SYRK here
    m = gram.shape[0]
    rank = min(rank, m)
    # Only the top `rank` eigenpairs (LAPACK dsyevr with an index range), in descending order.
    _, vecs = scipy.linalg.eigh(gram, subset_by_index=[m - rank, m - 1], driver="evr")
    top = torch.from_numpy(vecs[:, ::-1].copy())  # (m, R), a fresh array: torch refuses negative strides
    wt = torch.from_numpy(w64)
    if tall:
        return wt @ top, top.T  # B = W V_R = U_R S_R, A = V_Rᵀ
    sv = top.T @ wt  # (R, in) = S_R V_Rᵀ
    s = sv.norm(dim=1)  # (R,) singular values
    keep = s > 0
    a = torch.where(keep[:, None], sv / torch.where(keep, s, 1.0)[:, None], 0.0)
    return top * s, a  # B = U_R S_R, A = V_Rᵀ


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return (torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
            torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0))
