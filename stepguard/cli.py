"""The ``stepguard`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from stepguard.demo import DemoSettings, run_demo

    settings = DemoSettings(
        lr=args.lr,
        spike=args.spike,
        spike_at=args.spike_at,
        steps=args.steps,
        seed=args.seed,
        policy=args.policy,
        batch_size=args.batch_size,
        out=args.out,
    )
    run_demo(settings, progress=not args.quiet, sinks_for=_demo_sinks(args))
    if args.plot:
        from stepguard.plots import plot_demo

        plot_demo(f"{args.out}/summary.json", args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from stepguard.bench import run_from_args

    return run_from_args(args)


def _policy_check(args: argparse.Namespace) -> int:
    from stepguard.policy import Policy

    try:
        policy = Policy.from_file(args.file)
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


def _demo_sinks(args: argparse.Namespace):
    """TensorBoard sinks for both runs and a live Prometheus exporter for the guarded run."""

    def sinks_for(run: str) -> list:
        sinks: list = []
        if args.tensorboard:
            from stepguard.integrations.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(f"{args.tensorboard}/{run}"))
        if args.prometheus is not None and run == "guarded":
            from stepguard.integrations.prometheus import PrometheusSink

            sink = PrometheusSink(port=args.prometheus, run="demo")
            print(f"serving the guarded run's metrics at {sink.url}", file=sys.stderr)
            sinks.append(sink)
        return sinks

    return sinks_for


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepguard",
        description="Measure every optimizer step against the softmax's safe-step radius.",
    )
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
        choices=("clip", "veto", "safe", "monitor"),
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
    demo.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard events to DIR/{plain,guarded}")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(func=_demo)
    _add_policy_parser(commands)

    from stepguard.bench import DESCRIPTION as BENCH_DESCRIPTION
    from stepguard.bench import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="time a guarded training step against a plain one, on built-in models or yours",
        description=BENCH_DESCRIPTION,
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

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
