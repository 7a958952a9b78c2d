"""Low-rank factorization of the NoPE key and value projections into one shared latent.

    c = down x,   k_nope = up_k c,   v = up_v c

Methods (MHA2MLA): `joint` factors [W_k_nope ; W_v] with one SVD; `split` factors each separately with half
the latent. Weightings: `weights` is the paper's plain SVD of the weights; `activations` minimizes the error
on calibration activations instead (SVD of W S with S S^T = E[x x^T], as in SVD-LLM); `balanced` also
rescales the key rows so keys and values weigh the same in the SVD (TransMLA's K/V balancing), since raw
key rows are several times larger than value rows and would otherwise take all the rank. `attention` goes one
step further: it measures key errors in the metric of the queries that read them (E[q q^T] of the group's
query heads, since only q . k matters) and value errors in the metric of the output projection (W_o^T W_o),
then balances the two, so the rank goes where attention outputs change most.
"""
from __future__ import annotations

import torch

from edge_mla.plans import SVD_METHODS as METHODS, WEIGHTINGS  # noqa: F401
RIDGE = 1e-4  # relative to the mean eigenvalue of E[x x^T]; keeps the Cholesky factor well conditioned


def full_rank(rows_k: int, rows_v: int, hidden: int, method: str) -> int:
    """The largest latent that a factorization can use (and at which it is exact)."""
    if method == "split":
        return 2 * min(max(rows_k, rows_v), hidden)
    return min(rows_k + rows_v, hidden)


def check_latent(latent: int, rows_k: int, rows_v: int, hidden: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown SVD method '{method}': choose one of {', '.join(METHODS)}")
    top = full_rank(rows_k, rows_v, hidden, method)
    if latent <= 0:
        raise ValueError(f"latent width must be positive, got {latent}")
    if latent > top:
        raise ValueError(f"latent width {latent} is above the full rank {top} of the key/value projections "
                         f"({method} SVD); use at most {top}")
    if method == "split" and latent % 2:
        raise ValueError(f"split SVD halves the latent between keys and values, so it must be even; got {latent}")


def _whitener(xx: torch.Tensor) -> torch.Tensor:
    xx = xx.double()
    ridge = RIDGE * xx.diagonal().mean() * torch.eye(xx.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(xx + ridge)


def _basis(w: torch.Tensor, rank: int, whiten: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal basis (rows x rank) of the output space that keeps the most of w (or of w x)."""
    target = w if whiten is None else w @ whiten
    u, _, _ = torch.linalg.svd(target, full_matrices=False)
    u = u[:, :rank]
    if u.shape[1] < rank:  # split SVD: the smaller of K and V has fewer rows than its half of the latent
        u = torch.cat([u, torch.zeros(u.shape[0], rank - u.shape[1], dtype=u.dtype)], 1)
    return u


def _sqrt_and_inverse(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(metric.double())
    vals = vals.clamp_min(RIDGE * vals.mean().clamp_min(1e-30))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


def factorize(w_k: torch.Tensor, w_v: torch.Tensor, latent: int, method: str = "joint",
              weighting: str = "balanced", xx: torch.Tensor | None = None,
              key_metric: torch.Tensor | None = None, value_metric: torch.Tensor | None = None):
    """Return down (C x E), up_k (rows_k x C), up_v (rows_v x C), all float64, with up @ down ~ [w_k; w_v].
    `attention` weighting needs key_metric (rows_k x rows_k) and value_metric (rows_v x rows_v)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting '{weighting}': choose one of {', '.join(WEIGHTINGS)}")
    w_k, w_v = w_k.double(), w_v.double()
    check_latent(latent, w_k.shape[0], w_v.shape[0], w_k.shape[1], method)
    if weighting != "weights" and xx is None:
        raise ValueError(f"weighting '{weighting}' needs calibration statistics")
    whiten = None if weighting == "weights" else _whitener(xx)
    if weighting == "attention":
        # Factor in the metric spaces, then map the up-projections back: exact at full rank as before.
        sqrt_k, inv_k = _sqrt_and_inverse(key_metric)
        sqrt_v, inv_v = _sqrt_and_inverse(value_metric)
        down, up_k, up_v = factorize(sqrt_k @ w_k, sqrt_v @ w_v, latent, method, "balanced", xx)
        return down, inv_k @ up_k, inv_v @ up_v
    alpha = 1.0
    if weighting == "balanced":
        energy_k = torch.trace(w_k @ xx.double() @ w_k.T)
        energy_v = torch.trace(w_v @ xx.double() @ w_v.T)
        # no NoPE keys left (every frequency keeps RoPE): nothing to balance
        alpha = float((energy_v / energy_k).sqrt()) if energy_k > 1e-12 * energy_v else 1.0
    rows_k = w_k.shape[0]
    if method == "joint":
        w = torch.cat([alpha * w_k, w_v])
        basis = _basis(w, latent, whiten)
        down = basis.T @ w
        up = basis
        return down, up[:rows_k] / alpha, up[rows_k:]
    half = latent // 2
    basis_k = _basis(w_k, half, whiten)
    basis_v = _basis(w_v, half, whiten)
    down = torch.cat([basis_k.T @ w_k, basis_v.T @ w_v])
    up_k = torch.cat([basis_k, torch.zeros(rows_k, half, dtype=torch.float64)], 1)
    up_v = torch.cat([torch.zeros(w_v.shape[0], half, dtype=torch.float64), basis_v], 1)
    return down, up_k, up_v
