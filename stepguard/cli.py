"""The ``stepguard`` command line."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence

from stepguard._extras import missing_extra

# the optional packages behind the demo's flags: flag -> (module, extra)
_DEMO_EXTRAS = {
    "plot": ("matplotlib", "plot"),
    "prometheus": ("prometheus_client", "prometheus"),
    "tensorboard": ("tensorboard", "tensorboard"),
}


def version() -> str:
    """StepGuard's version, from the installed package's metadata."""
    from stepguard import __version__

    return __version__


def _demo_problem(args: argparse.Namespace) -> str | None:
    """What stops the demo before any training: a flag's missing package or a bad combination."""
    for flag, (module, extra) in _DEMO_EXTRAS.items():
        if getattr(args, flag) is not None:
            problem = missing_extra(module, extra, f"--{flag}")
            if problem:
                return problem
    if args.serve is not None and args.prometheus is None:
        return "--serve needs --prometheus PORT: it keeps that metrics endpoint up after training"
    if args.serve is not None and args.serve < 0:
        return f"--serve takes seconds >= 0, got {args.serve:g}"
    return None


def _demo(args: argparse.Namespace) -> int:
    from stepguard.demo import DemoSettings, run_demo

    problem = _demo_problem(args)
    if problem:
        print(f"stepguard demo: error: {problem}", file=sys.stderr)
        return 2
    settings = DemoSettings(
        lr=args.lr,
        spike=args.spike,
        spike_at=args.spike_at,
        steps=args.steps,
        seed=args.seed,
        policy=args.policy,
        batch_size=args.batch_size,
        out=args.out,
        threads=args.threads,
    )
    served: list = []
    try:
        run_demo(settings, progress=not args.quiet, sinks_for=_demo_sinks(args, served))
        if args.plot:
            from stepguard.plots import plot_demo

            plot_demo(f"{args.out}/summary.json", args.plot)
            print(f"plot written to {args.plot}")
        if served:
            _serve(served[0], args.serve)
    finally:
        for sink in served:
            sink.close()
    return 0


def _serve(sink, seconds: float) -> None:
    """Keep ``sink``'s metrics endpoint up for ``seconds`` after training (Ctrl-C ends it)."""
    print(f"serving the guarded run's metrics at {sink.url} for {seconds:g} s (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(seconds)


def _compare(args: argparse.Namespace) -> int:
    from stepguard.tools.compare import run_from_args

    return run_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    from stepguard.tools.bench import run_from_args

    return run_from_args(args)


def _policy_check(args: argparse.Namespace) -> int:
    from stepguard.policy import RulePolicy

    try:
        policy = RulePolicy.from_path(args.file)
    except ModuleNotFoundError as exc:
        print(f"stepguard policy check: error: {exc}", file=sys.stderr)
        return 2
    config = policy.config
    rules = ", ".join(f"{r.name} ({r.action.kind})" for r in config.rules) or "no rules"
    guard = ""
    if config.max_consecutive_vetoes is not None:
        guard = f"; {config.on_max_vetoes} after {config.max_consecutive_vetoes} vetoes in a row"
    count = len(config.rules)
    print(f"{args.file}: policy {config.name!r} is valid: {count} rule{'s' * (count != 1)}: {rules}{guard}")
    return 0


def _add_policy_parser(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser("policy", help="work with policy files", description="Policy files.")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    check = policy_commands.add_parser(
        "check",
        help="validate a policy file (YAML, JSON or TOML)",
        description=(
            "Validate a policy file and print a one-line summary (exit status 0), or print "
            "each problem with the key it concerns (exit status 2)."
        ),
    )
    check.add_argument("file", metavar="FILE", help="a .yaml, .yml, .json or .toml policy file")
    check.set_defaults(func=_policy_check)


class _OpenAfterTraining:
    """Passes reports to a sink but ignores the guard's ``close``, so the sink outlives training."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)

    def write(self, report) -> None:
        self.sink.write(report)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        """Left to whoever holds the sink itself."""


def _demo_sinks(args: argparse.Namespace, served: list):
    """TensorBoard sinks for both runs and a live Prometheus exporter for the guarded run.

    With ``--serve``, the exporter is appended to ``served`` and stays open after training.
    """

    def sinks_for(run: str) -> list:
        sinks: list = []
        if args.tensorboard:
            from stepguard.integrations.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(f"{args.tensorboard}/{run}"))
        if args.prometheus is not None and run == "guarded":
            from stepguard.integrations.prometheus import PrometheusSink

            sink = PrometheusSink(port=args.prometheus, run="demo")
            print(f"serving the guarded run's metrics at {sink.url}", file=sys.stderr)
            if args.serve is not None:
                served.append(sink)
                sinks.append(_OpenAfterTraining(sink))
            else:
                sinks.append(sink)
        return sinks

    return sinks_for


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepguard",
        description="Measure every optimizer step against the softmax's safe-step radius.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train an MLP on the embedded digits data, plain and guarded, through an LR spike",
        description=(
            "Train the same MLP with Adam twice (plain, and guarded by POLICY) on the embedded "
            "digits data, with the learning rate multiplied by SPIKE from step SPIKE_AT on, and "
            "print a comparison table. Reports go to OUT/plain.jsonl and OUT/guarded.jsonl."
        ),
    )
    demo.add_argument("--lr", type=float, default=1e-3, help="base learning rate (default 1e-3)")
    demo.add_argument("--spike", type=float, default=1000.0, help="LR multiplier (default 1000)")
    demo.add_argument("--spike-at", type=int, default=50, help="first spiked step (default 50)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of init, split and batches")
    demo.add_argument(
        "--policy",
        choices=("clip", "clip-fixed", "veto", "safe", "monitor"),
        default="clip",
        help="policy of the guarded run (default clip)",
    )
    demo.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--plot", metavar="PNG", help="also plot r and accuracy to this file")
    demo.add_argument(
        "--prometheus",
        type=int,
        metavar="PORT",
        help="serve the guarded run's metrics live on 127.0.0.1:PORT (0: a free port)",
    )
    demo.add_argument(
        "--serve",
        type=float,
        metavar="SECONDS",
        help="with --prometheus: keep the metrics endpoint up SECONDS after training (Ctrl-C ends it)",
    )
    demo.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard events to DIR/{plain,guarded}")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of torch (default 1: fastest at this size, and the same numbers everywhere)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(func=_demo)
    _add_policy_parser(commands)

    from stepguard.tools.bench import DESCRIPTION as BENCH_DESCRIPTION
    from stepguard.tools.bench import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="time a guarded training step against a plain one, on built-in models or yours",
        description=BENCH_DESCRIPTION,
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    from stepguard.tools.compare import DESCRIPTION as COMPARE_DESCRIPTION
    from stepguard.tools.compare import add_arguments as add_compare_arguments

    compare = commands.add_parser(
        "compare",
        help="StepGuard beside clip_grad_norm_, ZClip, SPAM, StableSPAM and SkipStepAdamW over an LR sweep",
        description=COMPARE_DESCRIPTION,
    )
    add_compare_arguments(compare)
    compare.set_defaults(func=_compare)

    from stepguard.analysis.cli import add_analyze_command

    add_analyze_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"stepguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
