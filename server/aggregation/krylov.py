"""The top-R singular triplets of W = P Q by block Krylov iteration on the factored operator, certified.

For a tall W = P Q (out ≥ in; P is (out, K), Q is (K, in)) the operator is applied as W x = P (Q x) and
Wᵀ y = Qᵀ (Pᵀ y), so W (out × in) is never formed and one block of b vectors costs 4 K (out + in) b flops
instead of the 2 K out in of forming W. This is the randomized block Krylov method (Musco & Musco, "Randomized
Block Krylov Methods for Stronger and Faster Approximate Singular Value Decomposition", NeurIPS 2015;
Halko, Martinsson & Tropp, SIAM Review 2011, §4) with Rayleigh–Ritz extraction and an a-posteriori residual
check after every block:

    Z_0 = orth(Ω),  Ω (in, b) Gaussian from a fixed seed;   Z_{j+1} = orth((I − Z Zᵀ) Wᵀ W Z_j),
    Z = [Z_0 … Z_j] (in, m) orthonormal,  Y = W Z (out, m),  G = Wᵀ Y (in, m),
    Zᵀ WᵀW Z = Zᵀ G = V̂ Λ V̂ᵀ  (top R eigenpairs),  σ_i = √λ_i,  V = Z V̂,  U S = W V = Y V̂.

**Certificate.** U S = W V holds by construction (W v_i = σ_i u_i up to rounding), so what is checked is the
other side, R = Wᵀ U − V S = (G V̂ − Z V̂ Λ) S⁻¹ (in, R), computed from the stored G in float64, and the
triplets are accepted when ‖R‖_F ≤ tol · σ_1. Because Vᵀ R = 0 (Rayleigh–Ritz), (U, S, V) are then exact
singular triplets of W + E with E = −U Rᵀ, ‖E‖_2 ≤ ‖R‖_F ≤ tol · σ_1: a backward-error bound. That they are
the *top* R of W + E rests on the random start (a start orthogonal to a leading singular vector has
probability zero; Halko et al. §10), as for every randomized SVD; the forward error of the rank-R truncation
also depends on the gap σ_R − σ_{R+1}, as for any SVD. A run that has not met the tolerance within
``max_blocks`` blocks, or whose Krylov space stops growing first, reports ``converged=False`` and the caller
takes the exact path; so does a zero W (σ_1 = 0) or one of numerical rank below R (no positive σ_R).

Deterministic: the start is drawn from ``seed`` and everything else is plain BLAS/LAPACK in float64, so a
given input and BLAS thread count give the same bits every run. It runs on numpy (OpenBLAS), whose float64
GEMM is the faster one on the AMD machines of docs/BENCHMARKS.md (torch's build uses MKL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.export.formats.errors import AggregationError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class KrylovSettings:
    """How hard the Krylov solver tries before the exact path takes over.

    ``tol`` is the certified ‖Wᵀ U − V S‖_F / σ_1 (default: about the rounding of the float32 factors the
    global adapter is stored in); ``max_blocks`` the budget; ``block`` the vectors per block (default
    ⌈R/2⌉, at least 8: a smaller block reaches a Krylov space of higher degree with fewer products in all,
    a larger one runs BLAS more efficiently); ``seed`` the start's seed.
    """

    tol: float = 1e-7
    max_blocks: int = 24
    block: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.tol < 1:
            raise AggregationError(f"krylov tol must be in (0, 1), got {self.tol}")
        for name in ("max_blocks", "block"):
            value = getattr(self, name)
            if value is None and name == "block":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AggregationError(f"krylov {name} must be a positive integer, got {value!r}")

    def block_size(self, rank: int, inp: int) -> int:
        return min(self.block or max(8, -(-rank // 2)), inp)


@dataclass(frozen=True)
class KrylovResult:
    """The outcome: ``b`` = U S (out, R) and ``a`` = Vᵀ (R, in) when ``converged``, else ``None``;
    ``residual`` = ‖Wᵀ U − V S‖_F / σ_1 of the last Ritz triplets (``inf`` when undefined)."""

    converged: bool
    residual: float
    blocks: int
    columns: int  # dimension of the final Krylov space
    b: Array | None = None
    a: Array | None = None


def top_singular(p: Array, q: Array, rank: int, settings: KrylovSettings = KrylovSettings()) -> KrylovResult:
    """The top ``rank`` singular triplets of the tall W = p @ q (float64 arrays, out ≥ in), certified."""
    import numpy as np

    inp = q.shape[1]
    if not 0 < rank <= inp:
        raise AggregationError(f"krylov: rank {rank} must be in 1..{inp}")
    b = settings.block_size(rank, inp)
    cap = min(inp, b * settings.max_blocks)
    zz = np.empty((inp, cap))  # Z, orthonormal columns
    gg = np.empty((inp, cap))  # G = WᵀW Z
    h = np.empty((cap, cap))  # Zᵀ G, filled block by block
    ys: list[Array] = []  # W Z_j, (out, b_j): only needed for the answer
    z = _orthonormal(np.random.default_rng(settings.seed).standard_normal((inp, b)), zz[:, :0])  # (in, b)
    m, residual, block = 0, float("inf"), 0
    while block < settings.max_blocks and z.shape[1]:
        block += 1
        j = slice(m, m + z.shape[1])
        y = p @ (q @ z)  # (out, b_j)
        zz[:, j], gg[:, j] = z, q.T @ (p.T @ y)
        ys.append(y)
        m = j.stop
        c = zz[:, :m].T @ gg[:, j]  # (m, b_j): the new block column of Zᵀ G
        h[:m, j], h[j, :m] = c, c.T
        h[j, j] = (c[j] + c[j].T) / 2  # symmetric up to rounding
        if m >= rank:  # R Ritz pairs exist
            vhat, lam = _ritz(h[:m, :m], rank)
            residual = _residual(zz[:, :m], gg[:, :m], vhat, lam)
            if residual <= settings.tol:
                return KrylovResult(True, residual, block, m, np.hstack(ys) @ vhat, (zz[:, :m] @ vhat).T)  # U S, Vᵀ
        if block < settings.max_blocks:  # the next block; empty once Z spans its budget or all of R^in
            z = _orthonormal(gg[:, j], zz[:, :m])[:, : cap - m]
    return KrylovResult(False, residual, block, m)


def _ritz(h: Array, rank: int) -> tuple[Array, Array]:
    """The top ``rank`` eigenpairs (V̂ (m, R), Λ (R,)) of the projected Zᵀ WᵀW Z, in descending order."""
    import numpy as np

    # the whole (small, m ≤ a few hundred) eigendecomposition: LAPACK's divide and conquer (syevd) is faster
    # here than a subset by MRRR (syevr), for the same eigenpairs within rounding
    lam, vec = np.linalg.eigh(h)
    return np.ascontiguousarray(vec[:, : -rank - 1 : -1]), lam[: -rank - 1 : -1].copy()


def _residual(z: Array, g: Array, vhat: Array, lam: Array) -> float:
    """‖Wᵀ U − V S‖_F / σ_1 with U = W V S⁻¹: column i is (G v̂_i − λ_i Z v̂_i) / σ_i. ``inf`` when some
    σ_i is not positive (W is zero or of rank < R within rounding: left to the exact path)."""
    import numpy as np

    if lam.shape[0] == 0 or not lam[-1] > 0:
        return float("inf")
    sigma = np.sqrt(lam)  # (R,)
    res = (g @ vhat - (z @ vhat) * lam) / sigma  # (in, R)
    return float(np.linalg.norm(res) / sigma[0])


def _orthonormal(x: Array, basis: Array) -> Array:
    """An orthonormal basis of the part of ``x``'s span orthogonal to ``basis`` (two Gram–Schmidt passes, then
    a QR; directions already in ``basis`` up to rounding are dropped)."""
    import numpy as np

    scale = float(np.linalg.norm(x, axis=0).max()) if x.size else 0.0
    for _ in range(2 if basis.shape[1] else 0):
        x = x - basis @ (basis.T @ x)
    u, r = np.linalg.qr(x)
    if scale > 0 and np.abs(np.diag(r)).min(initial=np.inf) > 1e-10 * scale:
        return u
    # Rank-deficient (the Krylov space is running out of new directions): keep only the directions that are new.
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    u = u[:, s > 1e-10 * scale] if scale > 0 else u[:, :0]
    if basis.shape[1] and u.shape[1]:
        u, _ = np.linalg.qr(u - basis @ (basis.T @ u))
    return u
