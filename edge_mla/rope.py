"""Partial-RoPE plans: which rotary frequency pairs keep RoPE, as linear maps from the original heads.

Head dims use the NEOX (rotate_half) layout of Llama/Qwen2/Mistral: pair f is dims (f, f + d/2), f = 0 is
the highest frequency. A plan is expressed as `RopeMaps`, linear maps that take one original query head and
the stacked original keys of all KV heads to the MLA layout:

    q_nope_h = q_nope[g] q_h        k_nope_g = k_nope[g] k          (no rotation)
    q_rope_h = q_rope[g] q_h        k_rope   = k_rope k              (rotated, one shared rope key)

with g the KV group of query head h. The rope key is one vector of R dims shared by all query heads (the
DeepSeek/llama.cpp layout); a per-KV-head selection puts each head's kept pairs side by side in it and
leaves the other groups' query rows zero. Pair p of the rope key is dims (p, p + R/2) with frequency
inv_freq[freq_index[p]]. Scores are exact: q_h . k_g equals nope + rope parts for every selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_mla.plans import DISJOINT_SELECTIONS, PER_HEAD_SELECTIONS, SELECTIONS  # noqa: F401


@dataclass
class RopeMaps:
    q_nope: torch.Tensor  # (n_kv, N, d)
    q_rope: torch.Tensor  # (n_kv, R, d)
    k_nope: torch.Tensor  # (n_kv, N, n_kv * d)
    k_rope: torch.Tensor  # (R, n_kv * d)
    freq_index: torch.Tensor  # (R/2,) long

    @property
    def nope_dim(self) -> int:
        return self.q_nope.shape[1]

    @property
    def rope_dim(self) -> int:
        return self.k_rope.shape[0]


def default_rope_pairs(selection: str, head_dim: int) -> int:
    """Per-head selections keep d/16 pairs per KV head (the paper's default); the shared head keeps all d/2."""
    return head_dim // 2 if selection == "shared" else max(1, head_dim // 16)


def check_rope_pairs(selection: str, r: int, head_dim: int, n_kv: int) -> None:
    half = head_dim // 2
    if selection not in SELECTIONS:
        raise ValueError(f"unknown RoPE selection '{selection}': choose one of {', '.join(SELECTIONS)}")
    if not 1 <= r <= half:
        raise ValueError(f"rope pairs r={r} is out of range: it must be between 1 and head_dim/2 = {half}")
    if selection.startswith("partition") and r * n_kv > half:
        raise ValueError(f"'{selection}' gives each of the {n_kv} KV heads its own {r} frequency pairs, but the head "
                         f"has only {half}: use r <= {half // n_kv}, or the 'shared' selection")


def kept_pairs(selection: str, r: int, n_kv: int, half: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Kept pair indices per KV head, (n_kv, r), for one layer. `scores` (n_kv, half) for the 2-norm kinds."""
    if selection == "high":
        rows = [list(range(r))] * n_kv
    elif selection == "low":
        rows = [list(range(half - r, half))] * n_kv
    elif selection == "uniform":
        rows = [[(k * half) // r for k in range(r)]] * n_kv
    elif selection == "partition":
        rows = [[g + n_kv * j for j in range(r)] for g in range(n_kv)]
    elif selection == "2norm":
        rows = scores.topk(r, dim=1).indices.tolist()
    elif selection == "partition-2norm":
        # The union stays the top r*n_kv frequencies (what llama.cpp's rope key can hold); the scores decide
        # which KV head gets which, greedily from the strongest (head, pair) score down.
        rows = [[] for _ in range(n_kv)]
        taken = set()
        order = scores[:, : r * n_kv].flatten().argsort(descending=True).tolist()
        for flat in order:
            g, f = divmod(flat, r * n_kv)
            if f not in taken and len(rows[g]) < r:
                rows[g].append(f)
                taken.add(f)
    else:
        raise ValueError(f"'{selection}' is not a per-head selection")
    return torch.tensor([sorted(row) for row in rows], dtype=torch.long)


def per_head_maps(kept: torch.Tensor, head_dim: int) -> RopeMaps:
    """Maps for a per-KV-head selection: every KV head keeps RoPE on its own pairs `kept[g]`."""
    n_kv, r = kept.shape
    d, half = head_dim, head_dim // 2
    pairs = sorted((int(f), g) for g in range(n_kv) for f in kept[g])  # by frequency, highest first
    P = len(pairs)
    R, N = 2 * P, d - 2 * r
    eye = torch.eye(d, dtype=torch.float64)
    q_rope = torch.zeros(n_kv, R, d, dtype=torch.float64)
    k_rope = torch.zeros(R, n_kv * d, dtype=torch.float64)
    for p, (f, g) in enumerate(pairs):
        q_rope[g, p, f] = q_rope[g, P + p, f + half] = 1.0
        k_rope[p, g * d + f] = k_rope[P + p, g * d + f + half] = 1.0
    q_nope = torch.zeros(n_kv, N, d, dtype=torch.float64)
    k_nope = torch.zeros(n_kv, N, n_kv * d, dtype=torch.float64)
    for g in range(n_kv):
        rope_dims = set(kept[g].tolist()) | {f + half for f in kept[g].tolist()}
        nope_dims = [i for i in range(d) if i not in rope_dims]
        q_nope[g] = eye[nope_dims]
        k_nope[g, :, g * d:(g + 1) * d] = eye[nope_dims]
    return RopeMaps(q_nope, q_rope, k_nope, k_rope, torch.tensor([f for f, _ in pairs], dtype=torch.long))


def position_free_maps(like: RopeMaps, head_dim: int) -> RopeMaps:
    """Maps for a layer without RoPE (SmolLM3's NoPE layers) under the shared rope head: every key dim is NoPE
    and the rope rows are zero, so the layer has the same widths as the others and scores exactly q . k."""
    n_kv, d = like.q_nope.shape[0], head_dim
    q_nope = torch.eye(d, dtype=torch.float64).expand(n_kv, d, d).clone()
    k_nope = torch.zeros(n_kv, d, n_kv * d, dtype=torch.float64)
    for g in range(n_kv):
        k_nope[g, :, g * d:(g + 1) * d] = torch.eye(d, dtype=torch.float64)
    return RopeMaps(q_nope, torch.zeros_like(like.q_rope), k_nope, torch.zeros_like(like.k_rope), like.freq_index)


def key_pair_covariance(w_k: torch.Tensor, b_k: torch.Tensor | None, xx: torch.Tensor, mean: torch.Tensor,
                        n_kv: int, head_dim: int) -> torch.Tensor:
    """Per frequency pair, the KV-head x KV-head second moment of the keys, (d/2, n_kv, n_kv), float64."""
    w = w_k.double()
    kk = w @ xx @ w.T
    if b_k is not None:
        wb = (w @ mean.double())[:, None] * b_k.double()[None, :]
        kk = kk + wb + wb.T + torch.outer(b_k.double(), b_k.double())
    half = head_dim // 2
    kk = kk.view(n_kv, head_dim, n_kv, head_dim)
    f = torch.arange(half)
    return (kk[:, f, :, f] + kk[:, f + half, :, f + half])  # (half, n_kv, n_kv)


def shared_head_rotations(cov: torch.Tensor) -> torch.Tensor:
    """TransMLA's RoRoPE: per frequency, the PCA of the KV heads' key pairs. (d/2, n_kv, n_kv), columns by
    falling variance. The same mix is applied to both dims of a pair, so it commutes with the rotation."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return eigvecs.flip(-1)


def shared_head_maps(rotations: torch.Tensor, r: int, head_dim: int, components: int = 1) -> RopeMaps:
    """Maps for the shared rope head: the first `components` principal mixes of the r highest frequencies
    keep RoPE in the shared key; everything else (other mixes, lower frequencies) becomes NoPE.
    With components = n_kv and r = d/2 nothing is dropped and the attention is the original's."""
    half, n_kv = head_dim // 2, rotations.shape[-1]
    d = head_dim
    pairs = [(f, j) for f in range(r) for j in range(components)]
    P = len(pairs)
    R = 2 * P
    q_rope = torch.zeros(n_kv, R, d, dtype=torch.float64)
    k_rope = torch.zeros(R, n_kv * d, dtype=torch.float64)
    for p, (f, j) in enumerate(pairs):
        u = rotations[f, :, j]
        for g in range(n_kv):
            q_rope[g, p, f] = q_rope[g, P + p, f + half] = u[g]
            k_rope[p, g * d + f] = k_rope[P + p, g * d + f + half] = u[g]
    # NoPE key of group g: k_g minus what the rope part already scores, sum_j u_j[g] k'_j (unrotated).
    q_nope = torch.eye(d, dtype=torch.float64).expand(n_kv, d, d).clone()
    k_nope = torch.zeros(n_kv, d, n_kv * d, dtype=torch.float64)
    for g in range(n_kv):
        k_nope[g, :, g * d:(g + 1) * d] = torch.eye(d, dtype=torch.float64)
        k_nope[g] -= q_rope[g].T @ k_rope
    return RopeMaps(q_nope, q_rope, k_nope, k_rope, torch.tensor([f for f, _ in pairs], dtype=torch.long))
