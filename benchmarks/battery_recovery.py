"""What the CPU recovery's text and objective buy on every kind of text: PyTorch perplexity of the MLA model over the
original's on the whole battery (edge_mla.texts), one row per variant, side by side in one run.

    python benchmarks/battery_recovery.py [--variants wiki,mixture,mixture-drift] [--steps 600] [--json out.json]

Variants (each converted from the original again, with the build's plan, recovery options and teacher size):
- wiki: calibration and recovery on the Wikipedia calibration split only (the build before 2026-12-06);
- mixture: on the built-in mixture of kinds (prose, code, docs, chat: texts.fit_texts);
- mixture-drift: the mixture, each block trained on the converted model's own inputs towards the original's
  residual stream (recover.LayerRecovery(corrects_drift=True)).
Scored in PyTorch with a float cache on `--windows` x `--length` tokens of each battery text (none fitted on); the
4-bit formats add about the same to both models (docs/quality.md has the runtimes' figures).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from edge_mla import data, plans, recover
from edge_mla.convert import calibrate_and_convert, named_plan
from edge_mla.eval import perplexity
from edge_mla.plans import RECOVER_STEPS, Calibration
from edge_mla.quality import text_windows
from edge_mla.source import load_source
from edge_mla.texts import BATTERY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="wiki,mixture,mixture-drift")
    ap.add_argument("--steps", type=int, default=RECOVER_STEPS, help="Adam steps per layer")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows per text")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    src = load_source(args.model)
    src.model.eval()
    tok = src.tokenizer
    texts = {key: torch.from_numpy(text_windows(tok, key, args.windows, args.length)) for key in BATTERY}
    reference = {key: perplexity(src.model, w) for key, w in texts.items()}
    print("original: " + ", ".join(f"{k} {v:.2f}" for k, v in reference.items()), flush=True)
    wiki_file = data.cache_dir() / "text" / "wikipedia_calibration.txt"  # the old default, as a user's file
    data.write_text_atomic(wiki_file, data.split_text("calibration"))
    pristine = copy.deepcopy(src.model)
    rows = []
    for variant in args.variants.split(","):
        texts_in = (str(wiki_file),) if variant == "wiki" else ()
        src.model = copy.deepcopy(pristine)
        t0 = time.perf_counter()
        recovery = recover.LayerRecovery(steps=args.steps, corrects_drift=variant.endswith("drift"),
                                         **plans.recovery_options(4, 4)) if args.steps else None
        teacher = plans.recovery_windows(tok, texts_in) if args.steps else None
        calibrate_and_convert(src, named_plan("recovered", src.model.config), teacher=teacher, converted=recovery,
                              **Calibration(texts=texts_in).of("convert"))
        ratios = {key: round(perplexity(src.model, w) / reference[key], 3) for key, w in texts.items()}
        rows.append({"variant": variant, "steps": args.steps, "seconds": round(time.perf_counter() - t0),
                     "ratios": ratios, "worst": max(ratios.values())})
        print(f"{variant:14s} " + " ".join(f"{k} {v:.3f}" for k, v in ratios.items())
              + f"  worst {rows[-1]['worst']:.3f} ({rows[-1]['seconds']} s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "reference_perplexity": reference, "windows": args.windows,
                           "length": args.length, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
