"""How the ``clip`` preset was chosen: candidate clip rules over seeds, on the cells that decide.

Two kinds of cell pull a clip rule in opposite directions:

* the language models at plain AdamW's best learning rate (1e-2), where healthy steps
  often have r > 1 and clipping them costs final loss ("no cost of safety": within
  0.5 % of plain);
* classifiers at learning rates 10–100× their best (0.1 and 1), with and without a ×1000
  spike, where letting steps with r of 2–10 through loses accuracy.

This script trains each candidate on those cells for a few seeds (the workloads of
``stepguard compare``, AdamW with weight decay 0.01) and writes every run and the median
over seeds per cell. The candidates: ``clip-fixed`` (r ≤ 1 on every step), the relative
rule alone (``RelativeClipPolicy(sustained_r=None)``: r > 10, or r > 1 standing out from
the run's own r), the relative rule with a lower hard limit (3 or 5), a rule on the top-2
radius (τ/ρ_top2 ≤ 1, with r ≤ 10), and the relative rule with a sustained limit (r > 2 or
r > 3 on three steps in a row), whose first version is the ``clip`` preset.

    python examples/clip_candidates.py --seeds 0,1,2 --out runs/clip_candidates.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence

import torch
from _common import parse_list, write_json

from stepguard.policy import ClipPolicy, Policy, RelativeClipPolicy
from stepguard.report import Decision, StepReport
from stepguard.tools.compare import default_spike, guard_method, train
from stepguard.tools.compare_workloads import build_workload


class Top2RadiusClip(Policy):
    """Clip so that τ/ρ_top2 ≤ 1 (the per-row radius of the top two logits), and r ≤ 10 → r = 1."""

    def __init__(self, hard_r: float = 10.0) -> None:
        self.hard_r = hard_r

    def decide(self, report: StepReport) -> Decision:
        if not (math.isfinite(report.tau) and math.isfinite(report.r)):
            return Decision("veto", 0.0, "not finite")
        scale = 1.0
        rho = report.rho_top2
        if rho is not None and math.isfinite(rho) and rho > 0 and report.tau > rho:
            scale = rho / report.tau
        if report.r > self.hard_r:
            scale = min(scale, 1.0 / report.r)
        return Decision("clip", scale, "top-2 radius") if scale < 1.0 else Decision()


CANDIDATES: dict[str, Callable[[], str | Policy]] = {
    "plain (monitor)": lambda: "monitor",
    "clip-fixed": lambda: ClipPolicy(1.0),
    "relative alone": lambda: RelativeClipPolicy(sustained_r=None),
    "relative hard 3": lambda: RelativeClipPolicy(hard_r=3.0, sustained_r=None),
    "relative hard 5": lambda: RelativeClipPolicy(hard_r=5.0, sustained_r=None),
    "top-2 radius": Top2RadiusClip,
    "sustained r>3 x3": lambda: RelativeClipPolicy(sustained_r=3.0),
    "clip (sustained r>2 x3)": lambda: "clip",
}

CELLS: tuple[tuple[str, float, str], ...] = (
    ("byte-lm", 1e-2, "none"),
    ("llama", 1e-2, "none"),
    ("digits-mlp", 0.1, "none"),
    ("digits-mlp", 0.1, "spike"),
    ("digits-mlp", 1.0, "spike"),
    ("grid-transformer", 0.1, "none"),
    ("grid-transformer", 0.1, "spike"),
    ("grid-transformer", 1.0, "spike"),
    ("grid-mlp-ln", 1e-2, "none"),
)
STEPS = {"byte-lm": 150, "llama": 80}  # the language models' runs of the Comparison page's gap table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma list of the names above")
    parser.add_argument(
        "--cells", default=None, help="comma list of workload:lr:condition (default: the cells above)"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps of every run (default: as above)")
    parser.add_argument("--out", default="runs/clip_candidates.json")
    args = parser.parse_args(argv)
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {unknown}; known: {', '.join(CANDIDATES)}")
    cells = CELLS
    if args.cells:
        try:
            parts = (cell.split(":") for cell in args.cells.split(","))
            cells = tuple((w, float(lr), c) for w, lr, c in parts)
        except ValueError:
            parser.error(f"--cells takes workload:lr:condition items, got {args.cells!r}")
    torch.set_num_threads(1)
    workloads = {}
    rows = []
    for seed in parse_list(args.seeds, int):
        for name_w, lr, condition in cells:
            if name_w not in workloads:
                workload = build_workload(name_w)
                steps = args.steps or STEPS.get(name_w)
                workloads[name_w] = workload.with_steps(steps) if steps else workload
            workload = workloads[name_w]
            for name in names:
                if name == "plain (monitor)" and name_w not in STEPS:
                    continue  # the classifiers' plain runs diverge or lose nothing to compare
                spike = default_spike(workload.steps) if condition == "spike" else None
                run = train(
                    workload, guard_method(name, CANDIDATES[name]), lr, seed=seed, spike=spike,
                    eval_every=20 if name_w in STEPS else 10, condition=condition,
                )
                row = {
                    "seed": seed, "workload": name_w, "lr": lr, "condition": condition, "candidate": name,
                    "status": run.status, "final": run.final, "worst_after_spike": run.worst_after_spike,
                    "clipped": sum(1 for s in run.scale if s < 1),
                }
                rows.append(row)
                print(
                    f"seed {seed} {name_w:<16} lr {lr:<5g} {condition:<5} {name:<24} {run.status:<8} "
                    f"final {run.final:.4f}  clipped {row['clipped']}",
                    flush=True,
                )
    medians = []
    for name_w, lr, condition in cells:
        for name in names:
            finals = [r["final"] for r in rows if (r["workload"], r["lr"], r["condition"], r["candidate"])
                      == (name_w, lr, condition, name)]
            if finals:
                medians.append({"workload": name_w, "lr": lr, "condition": condition, "candidate": name,
                                "median_final": statistics.median(finals), "finals": finals})
    write_json(args.out, {"seeds": parse_list(args.seeds, int), "runs": rows, "medians": medians})
    return 0


if __name__ == "__main__":
    sys.exit(main())
