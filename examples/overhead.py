"""What a StepGuard costs: guarded vs plain Adam step time, the guard's time by phase, and memory.

A thin script over :mod:`stepguard.tools.bench` (the same code and flags as ``stepguard bench``).
In one process it times a plain training step (forward, loss, backward, Adam) against
the same step under a guard measuring every 1, 4 and 16 steps and in budget mode,
interleaved in blocks after a warm-up, and reports median ratios with their per-round
spread, the split of the guard's own time (snapshot, measure, sync, decide, commit …)
and the extra memory (θ₀ snapshot, state backup, JVP transients).

Examples::

    python examples/overhead.py                          # built-in MLP, CNN and LM, CPU
    python examples/overhead.py --models mlp --json runs/overhead.json
    python examples/overhead.py --model mypkg.nets:make_net --input-shape 3,32,32 --classes 10
    python examples/overhead.py --device cuda --threads 0

Run ``python examples/overhead.py --help`` for every flag.
"""

from __future__ import annotations

import sys

from stepguard.tools.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="overhead.py"))
