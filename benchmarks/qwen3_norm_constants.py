"""Qwen3's per-head q/k RMSNorm replaced by a constant: which constant, and which norm costs most.

    python benchmarks/qwen3_norm_constants.py [--seeds 0,1,2] [--json out.json]

On the tests' tiny random Qwen3 (tests/test_families.py: Qwen3Config, hidden 64, 4 heads, 2 KV heads, head_dim
16, 4 layers), for each seed: the max logit error (share of the largest logit) on the tests' prompt when the
query norm, the key norm or both become constants, for three estimators of the constant from the tests'
calibration windows: the mean of 1/rms, its median, and the least-squares fit E[rms]/E[rms^2] that
edge_mla.families.norm_scales uses. A random tiny model says which choice is better, not what a real Qwen3 loses.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import calibration_windows, prompt  # noqa: E402
from test_families import family_model, logits  # noqa: E402

ESTIMATORS = {"mean of 1/rms": lambda rms, ms: (1 / rms).mean(0),
              "median of 1/rms": lambda rms, ms: (1 / rms).median(0).values,
              "least squares E[rms]/E[rms^2]": lambda rms, ms: rms.mean(0) / ms.mean(0)}


@torch.no_grad()
def mean_squares(model, windows) -> dict:
    """(layer, "q"|"k") -> [tokens, heads] mean square of each head as its RMSNorm computes it (+ eps)."""
    found, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(module, args, kwargs, i=i, attn=attn):
            x = kwargs["hidden_states"].reshape(-1, attn.q_proj.in_features)
            for name, proj, norm in (("q", attn.q_proj, attn.q_norm), ("k", attn.k_proj, attn.k_norm)):
                y = proj(x).double().view(x.shape[0], -1, attn.head_dim)
                found.setdefault((i, name), []).append(y.pow(2).mean(-1) + norm.variance_epsilon)
        hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    for window in windows:
        model(window[None])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in found.items()}


@torch.no_grad()
def error(original, stats, estimator, which: str) -> float:
    model = copy.deepcopy(original)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in which:
            proj, norm = getattr(attn, f"{name}_proj"), getattr(attn, f"{name}_norm")
            ms = stats[(i, name)]
            s = estimator(ms.sqrt(), ms)
            proj.weight.view(len(s), attn.head_dim, -1).mul_((s[:, None] * norm.weight.double()).float()[..., None])
            setattr(attn, f"{name}_norm", torch.nn.Identity())
    ids = prompt(seed=7)
    want = logits(original, ids)
    return float((logits(model, ids) - want).abs().max() / want.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        original = family_model("qwen3", seed=seed)
        stats = mean_squares(original, calibration_windows())
        for label, estimator in ESTIMATORS.items():
            row = {"seed": seed, "constant": label}
            row.update({f"{which} norm": round(error(original, stats, estimator, which), 3)
                        for which in ("q", "k", "qk")})
            rows.append(row)
    print("| seed | constant | query norm only | key norm only | both |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['constant']} | {r['q norm']} | {r['k norm']} | {r['qk norm']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
