"""``stepguard analyze``: measure every transition between a run's checkpoints, write the report."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = (
    "Replay a finished run from its checkpoints: for every pair of consecutive checkpoints, the "
    "update theta_{t+1} - theta_t is measured at theta_t on the probe data (the live guard's "
    "measurement): step length tau, radius rho_a, normalized step r, binary radius, softmax "
    "collapse, NLM cosine, loss and accuracy, and the samples that bind. Writes OUT/report.jsonl, "
    "report.csv, checkpoints.csv, summary.json, TensorBoard events and a self-contained report.html."
)


def add_analyze_command(commands: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` on the ``stepguard`` sub-command parser (imports nothing heavy)."""
    p = commands.add_parser(
        "analyze",
        help="measure every transition between a run's saved checkpoints and write a report",
        description=DESCRIPTION,
    )
    p.add_argument(
        "ckpt_dir",
        nargs="?",
        metavar="CKPT_DIR",
        help="directory of checkpoints (*.pt, *.pth, *.ckpt, *.safetensors), ordered by the step in "
        "their names",
    )
    p.add_argument(
        "--checkpoints", nargs="+", metavar="FILE", help="explicit checkpoint files, in this order"
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="zero-argument factory building the model: pkg.module:factory or path/file.py:factory",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="PROBE",
        help="torch.save'd dict with 'inputs' (optional 'targets', 'mask'), or digits / digits:test",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (created)")
    p.add_argument(
        "--validation", metavar="PROBE", help="validation probe (for --cld; also val loss/accuracy)"
    )
    p.add_argument(
        "--mode",
        choices=("train", "eval"),
        default="train",
        help="measure the training function (default; dropout from --seed, batch statistics) or eval mode",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto")
    p.add_argument("--flips", action="store_true", help="negative-flip rate between consecutive checkpoints")
    p.add_argument("--cld", action="store_true", help="CLD coreset scores (needs --validation)")
    p.add_argument(
        "--cld-fraction",
        type=float,
        metavar="F",
        help="with --cld, also select a coreset: the top fraction F of each class",
    )
    p.add_argument(
        "--bridge",
        action="store_true",
        help="measure across a bad checkpoint (its neighbours) instead of reporting both transitions missing",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad checkpoint instead of skipping it"
    )
    p.add_argument("--key", help="entry of each checkpoint holding the state dict (detected by default)")
    p.add_argument("--prefix", help="key prefix to strip, e.g. 'model.' (detected by default)")
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow pickled Python objects in checkpoints (torch.load weights_only=False; "
        "trusted files only)",
    )
    p.add_argument(
        "--binding-k", type=int, default=5, help="binding samples reported per transition (default 5)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature of the loss (default 1)"
    )
    p.add_argument(
        "--r-limit", type=float, default=1.0, help="flag transitions with r at or above this (default 1)"
    )
    p.add_argument(
        "--sc-rise",
        type=float,
        default=0.01,
        help="flag transitions whose softmax-collapse fraction rose by this much (default 0.01)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the replayed forward's random numbers")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument(
        "--fail-on-flag", action="store_true", help="exit with status 1 when a transition is flagged"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_analyze)
    return p


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``stepguard analyze`` with parsed arguments; returns the exit status."""
    from stepguard.analysis.errors import AnalysisError
    from stepguard.analysis.model import load_factory
    from stepguard.analysis.outputs import write_outputs
    from stepguard.analysis.probe import load_probe
    from stepguard.analysis.progress import ProgressBar
    from stepguard.analysis.replay import analyze
    from stepguard.config import GuardConfig

    if (args.ckpt_dir is None) == (args.checkpoints is None):
        raise ValueError("give either CKPT_DIR or --checkpoints FILE ... (not both)")
    if args.cld_fraction is not None and not args.cld:
        raise ValueError("--cld-fraction needs --cld")
    factory = load_factory(args.model)
    probe = load_probe(args.data)
    validation = load_probe(args.validation) if args.validation else None
    config = GuardConfig(mode=args.mode, binding_k=args.binding_k, temperature=args.temperature)
    bar = None if args.quiet else ProgressBar()
    try:
        result = analyze(
            args.checkpoints if args.checkpoints is not None else args.ckpt_dir,
            factory,
            probe,
            validation=validation,
            device=args.device,
            flips=args.flips,
            cld=args.cld,
            cld_fraction=args.cld_fraction,
            bridge=args.bridge,
            strict=args.strict,
            key=args.key,
            prefix=args.prefix,
            unsafe_load=args.unsafe_load,
            config=config,
            seed=args.seed,
            r_limit=args.r_limit,
            sc_rise=args.sc_rise,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    write_outputs(result, args.out, tensorboard=not args.no_tensorboard)
    for record in result.checkpoints:
        if not record.ok:
            print(f"stepguard analyze: skipped {record.path}: {record.error}", file=sys.stderr)
    for note in result.notes:
        print(f"stepguard analyze: note: {note}", file=sys.stderr)
    if not result.transitions:
        raise AnalysisError(nothing_measured(result, args.out))
    rs = [t.report.r for t in result.transitions if t.report.r == t.report.r]
    largest = f"{max(rs):.4g}" if rs else "nan (no transition has a finite r)"
    print(
        f"{len(result.transitions)} transitions measured ({len(result.flagged)} flagged, "
        f"{len(result.missing)} missing); largest r = {largest}; "
        f"report in {args.out}/report.html"
    )
    return 1 if args.fail_on_flag and result.flagged else 0


def nothing_measured(result: Any, out: str) -> str:
    """The error when no transition could be measured: why, for the first few, and what to try."""
    reasons = [f"{m.step_from} → {m.step_to}: {m.reason}" for m in result.missing[:3]]
    more = f"; … and {len(result.missing) - 3} more" if len(result.missing) > 3 else ""
    why = f" ({'; '.join(reasons)}{more})" if reasons else ""
    hint = "" if result.settings.get("bridge") else "; --bridge measures across a skipped checkpoint"
    return (
        f"no transition could be measured: all {len(result.missing)} are missing{why}{hint}; "
        f"the outputs in {out} list the skipped checkpoints"
    )
