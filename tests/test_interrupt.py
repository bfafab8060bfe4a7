"""A real `ssl-course pretrain` process, stopped by kill -9, SIGTERM or SIGINT, then resumed with
--resume, ends with the same encoder, byte for byte, as an uninterrupted run (CPU)."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS, EVERY = 200, 10


def pretrain_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "import sys; from ssl_course.cli import main; sys.exit(main())",
        "pretrain", "--method", "simclr", "--dataset", "digits", "--steps", str(STEPS),
        "--batch-size", "32", "--checkpoint-every", str(EVERY), "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def latest_step(out: Path) -> int:
    ptr = out / "checkpoints" / "latest"
    try:
        return int(ptr.read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return 0


def start_and_stop(out: Path, sig: int, after_step: int = 3 * EVERY):
    "Start a run, wait for its checkpoint of `after_step`, send `sig`; return the finished process."
    proc = subprocess.Popen(
        pretrain_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while latest_step(out) < after_step:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc, stdout, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(pretrain_cmd(out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sha(out / "encoder.safetensors"), json.loads((out / "report.json").read_text())


def resume_to_the_end(out: Path, reference):
    proc = subprocess.run(
        pretrain_cmd(out, "--resume"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume: continuing from step" in proc.stdout
    assert sha(out / "encoder.safetensors") == reference[0]
    report = json.loads((out / "report.json").read_text())
    assert report["last_loss"] == reference[1]["last_loss"]


def test_kill_9_at_any_moment_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    proc, _, _ = start_and_stop(out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "encoder.safetensors").exists()
    assert EVERY <= latest_step(out) < STEPS
    resume_to_the_end(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_a_step_boundary_saves_and_resumes_bit_identical(
    sig, tmp_path, reference
):
    out = tmp_path / "run"
    proc, _, stderr = start_and_stop(out, sig)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in stderr and "--resume" in stderr
    stopped_at = int(stderr.split(f"stopped by {name} after step ")[1].split(";")[0])
    assert latest_step(out) == stopped_at  # the checkpoint of the step it stopped after
    assert 3 * EVERY <= stopped_at < STEPS
    resume_to_the_end(out, reference)


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    out = tmp_path / "fresh"
    cmd = pretrain_cmd(out, "--resume")
    cmd[cmd.index(str(STEPS))] = "12"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume: no checkpoint in" in proc.stdout and "starting from step 0" in proc.stdout
