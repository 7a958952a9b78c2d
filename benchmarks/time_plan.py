"""How close a build's start-of-build estimate (timeplan.estimate, from its probe) came to what each step took, from
the report.json of builds that ran with --time-budget. The whole build's total says little (the recovery fills
what is left, so every budgeted build lands near its budget); the steps the recovery does not fill are the test:
the originals' exports and scoring, the MLA exports, the MLA scoring and speed runs.

    python benchmarks/time_plan.py docs/results/build_*_report.json --out docs/results/time_plan_accuracy.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# The estimate's parts that each progress step runs (job.took's step numbers; with a recovery the build has six
# steps, the recovery printed inside the conversion's step 3; without one, five).
STEPS_WITH_RECOVERY = {"2": ("original exports", "original scoring"), "3": ("conversion", "teacher pass", "recovery"),
                       "5": ("MLA exports",), "6": ("MLA scoring", "speed")}
STEPS_WITHOUT = {"2": ("original exports", "original scoring"), "3": ("conversion",), "4": ("MLA exports",),
                 "5": ("MLA scoring", "speed")}
NAMES = {"2": "originals: exports + scoring", "3": "conversion (+ recovery)", "5": "MLA exports", "4": "MLA exports",
         "6": "MLA scoring + speed"}


def compare(report: dict) -> list[dict]:
    """One row per progress step: its estimate (the sum of its parts) and what it took."""
    plan = report["time_plan"]
    recovered = plan["sizes"]["recover"]
    steps = STEPS_WITH_RECOVERY if recovered else STEPS_WITHOUT
    names = dict(NAMES, **({"5": "MLA scoring + speed"} if not recovered else {}))
    rows = []
    for step, parts in steps.items():
        took = plan["took_seconds"].get(step)
        estimated = sum(plan["estimate_seconds"].get(p, 0.0) for p in parts)
        if took is None or not estimated:
            continue
        rows.append({"step": step, "what": names[step], "estimated_s": round(estimated, 1), "took_s": took,
                     "took_over_estimate": round(took / estimated, 2)})
    rows.append({"step": "all", "what": "the build (one-off fetching included)",
                 "estimated_s": plan["estimate_total_seconds"], "took_s": report["build_seconds"],
                 "took_over_estimate": round(report["build_seconds"] / plan["estimate_total_seconds"], 2)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="report.json files of budgeted builds")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    results = {}
    print(f"{'build':<36} {'step':<30} {'estimated s':>11} {'took s':>8} {'took/est':>9}")
    for path in args.reports:
        report = json.loads(path.read_text())
        if not report.get("time_plan"):
            print(f"{path.name:<36} (no time plan: built without --time-budget)")
            continue
        rows = compare(report)
        probe = report["time_plan"]["probe"]
        results[path.name] = {"probe_token_ms": round(1000 * probe["layer_token_seconds"] * probe["layers"], 2),
                              "steps_per_layer": (report.get("recovery") or {}).get("steps_per_layer"), "rows": rows}
        for r in rows:
            print(f"{path.name:<36} {r['what']:<30} {r['estimated_s']:>11.0f} {r['took_s']:>8.0f} "
                  f"{r['took_over_estimate']:>9.2f}")
    worst = [r["took_over_estimate"] for v in results.values() for r in v["rows"] if r["step"] != "all"]
    if worst:
        print(f"steps the recovery does not fill: took {min(worst):.2f}-{max(worst):.2f}x their estimate")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
