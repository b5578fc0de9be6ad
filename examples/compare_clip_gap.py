"""What clipping costs at plain AdamW's best learning rate, policy by policy.

At the LR where plain AdamW does best, clipping every step to r ≤ 1 (the ``clip-fixed``
preset) ends worse than plain on the language models of ``stepguard compare``. This
script trains plain AdamW under a ``monitor`` guard (which measures r and changes
nothing), ``clip-fixed``, two warm-ups of its target (``warmup_clip_policy()``: r ≤ 3 for
the first 100 steps, and ``warmup_clip_policy(1, 2, 10)``: r ≤ 2 for the first 10; then
r ≤ 1), the relative rule alone (``RelativeClipPolicy(sustained_r=None)``) and the
``clip`` preset over a few seeds, and prints for each: the final validation loss (or test
accuracy), its gap to plain, how many steps were clipped (and how many of them in the
first 5 steps), and r on the first 5 steps.

    python examples/compare_clip_gap.py --workload byte-lm --lr 1e-2 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch
from _common import parse_list, write_json

from stepguard.policy import ClipPolicy, RelativeClipPolicy
from stepguard.tools.compare import guard_method, train, warmup_clip_policy
from stepguard.tools.compare_workloads import WORKLOADS, build_workload

VARIANTS = {
    "plain (monitor)": lambda: "monitor",
    "clip-fixed (r<=1)": lambda: ClipPolicy(1.0),
    "warmup 100 (r<=3)": warmup_clip_policy,
    "warmup 10 (r<=2)": lambda: warmup_clip_policy(1.0, 2.0, 10),
    "relative alone": lambda: RelativeClipPolicy(sustained_r=None),
    "clip (preset)": lambda: "clip",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="byte-lm", help=f"one of {', '.join(WORKLOADS)}")
    parser.add_argument("--lr", type=float, default=1e-2, help="plain AdamW's best LR on that workload")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="default: the workload's own")
    parser.add_argument("--out", default="runs/compare_clip_gap.json")
    args = parser.parse_args(argv)
    if args.workload not in WORKLOADS:
        parser.error(f"unknown workload {args.workload!r}; known: {', '.join(WORKLOADS)}")
    torch.set_num_threads(1)
    workload = build_workload(args.workload)
    if args.steps:
        workload = workload.with_steps(args.steps)
    rows = []
    for seed in parse_list(args.seeds, int):
        base = None
        for name, policy in VARIANTS.items():
            run = train(workload, guard_method(name, policy), args.lr, seed=seed)
            clipped = [i for i, s in enumerate(run.scale) if s < 1]
            base = run.final if base is None else base
            gap = (run.final - base) / abs(base) * (-1 if workload.higher_is_better else 1) + 0.0
            row = {
                "seed": seed,
                "variant": name,
                "final": run.final,
                "gap_to_plain": gap,
                "clipped": len(clipped),
                "clipped_in_first_5": sum(i < 5 for i in clipped),
                "r_first_5": [round(r, 2) for r in run.r[:5]],
                "max_r": max(run.r),
            }
            rows.append(row)
            print(
                f"seed {seed} {name:<16} final {run.final:.4f}  gap {100 * gap:+.2f} %  "
                f"clipped {len(clipped):>3} "
                f"({row['clipped_in_first_5']} in the first 5)  r first 5 {row['r_first_5']}",
                flush=True,
            )
    print("\nmedian gap to plain over seeds:")
    for name in VARIANTS:
        gaps = [r["gap_to_plain"] for r in rows if r["variant"] == name]
        print(f"  {name:<16} {100 * statistics.median(gaps):+.2f} %")
    write_json(args.out, {"workload": workload.name, "lr": args.lr, "steps": workload.steps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
