"""The ``stepguard`` command line: version, missing extras, threads, the log without a terminal."""

from __future__ import annotations

import io
import subprocess
import sys
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch

import stepguard
from stepguard.cli import main
from stepguard.demo import DemoSettings, Progress, run_demo


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"stepguard {metadata.version('stepguard')}"
    assert stepguard.__version__ == metadata.version("stepguard")


@pytest.mark.parametrize(
    ("flags", "module", "extra", "requirement"),
    [
        (["--plot", "demo.png"], "matplotlib", "plot", "matplotlib>=3.7"),
        (["--prometheus", "0"], "prometheus_client", "prometheus", "prometheus-client>=0.19"),
        (["--tensorboard", "tb"], "tensorboard", "tensorboard", "tensorboard>=2.14"),
    ],
)
def test_a_missing_extra_fails_before_any_training(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    flags: list[str], module: str, extra: str, requirement: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without it looks like
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert f"pip install -e '.[{extra}]'" in lines[0]  # a clone
    assert f"pip install '{requirement}'" in lines[0]  # an installed package
    assert not out.exists() and captured.out == "", "the demo trained before failing"


def test_serve_needs_a_metrics_port(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--serve", "5"]) == 2
    assert "--serve needs --prometheus PORT" in capsys.readouterr().err


def test_the_demo_trains_with_its_own_thread_count(tmp_path) -> None:
    seen: list[int] = []

    class ThreadProbe:
        def write(self, report) -> None:
            seen.append(torch.get_num_threads())

        def flush(self) -> None: ...

        def close(self) -> None: ...

    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    summary = run_demo(
        DemoSettings(steps=2, spike_at=1, out=str(tmp_path), threads=wanted),
        progress=False, stream=io.StringIO(), sinks_for=lambda run: [ThreadProbe()],
    )
    assert seen == [wanted] * 4
    assert torch.get_num_threads() == before, "the caller's thread count was not restored"
    assert summary["settings"]["threads"] == wanted
    with pytest.raises(ValueError, match="threads"):
        DemoSettings(threads=0)


def test_without_a_terminal_the_log_is_a_line_per_25_steps() -> None:
    stream = io.StringIO()  # not a TTY
    steps = 200
    progress = Progress(2 * steps, stream)
    for run in ("plain", "guarded"):
        for step in range(steps):
            action = "clip" if run == "guarded" and step >= 50 else "allow"
            progress(run, step, SimpleNamespace(r=float(step), action=action), 0.5)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 * steps // 25, stream.getvalue()
    assert "max r 199" in lines[-1] and "25 clipped" in lines[-1]
    assert "25 allowed" in lines[0] and "max r 24" in lines[0]


@pytest.mark.slow
def test_the_cli_starts_without_warnings() -> None:
    done = subprocess.run([sys.executable, "-W", "default", "-m", "stepguard", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stderr == "", done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("blocked", "call", "extra"),
    [
        ("matplotlib", "from stepguard.plots import _matplotlib; _matplotlib()", "plot"),
        ("tensorboard", "from stepguard.integrations.tensorboard import TensorBoardSink; TensorBoardSink('tb')",
         "tensorboard"),
        ("prometheus_client", "from stepguard.integrations.prometheus import PrometheusSink; PrometheusSink(port=0)",
         "prometheus"),
    ],
)
def test_library_install_hints_work_for_a_clone(tmp_path, blocked: str, call: str, extra: str) -> None:
    code = f"import sys; sys.modules[{blocked!r}] = None\ntry:\n    {call}\nexcept ImportError as exc:\n    print(exc)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert f"pip install -e '.[{extra}]' in a StepGuard clone, or pip install '" in done.stdout, done.stdout
