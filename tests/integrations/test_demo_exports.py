"""``stepguard demo --prometheus PORT --tensorboard DIR`` exports the runs live."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("tensorboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serves_metrics_while_training_and_writes_events(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "stepguard",
        "demo",
        "--steps",
        "400",
        "--spike-at",
        "20",
        "--quiet",
        "--out",
        str(tmp_path / "demo"),
        "--prometheus",
        str(port),
        "--tensorboard",
        str(tmp_path / "tb"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scraped = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    scraped = response.read().decode()
                if 'stepguard_actions_total{action="clip",run="demo"}' in scraped:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stepguard_normalized_step" in scraped and 'action="clip"' in scraped
    accumulator = EventAccumulator(str(tmp_path / "tb" / "guarded"), size_guidance={SCALARS: 0})
    accumulator.Reload()
    assert len(accumulator.Scalars("stepguard/r")) == 400


def test_serve_keeps_the_metrics_endpoint_up_after_training(tmp_path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "stepguard", "demo", "--steps", "4", "--spike-at", "2", "--quiet",
           "--out", str(tmp_path / "demo"), "--prometheus", str(port), "--serve", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        table = proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
        assert "final acc" in table, table + proc.stderr.read()
        deadline = time.monotonic() + 30
        while "for 60 s" not in (line := proc.stderr.readline()):
            assert time.monotonic() < deadline and line, "no 'serving ... for 60 s' line"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            scraped = response.read().decode()
        assert 'stepguard_steps_total{run="demo"} 4.0' in scraped
        assert proc.poll() is None, "the demo exited instead of serving"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
