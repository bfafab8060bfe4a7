"The ssl-course command line (ssl_course.cli)."

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ssl_course.cli import CHAPTERS, format_table, main, parse_label_counts


def run_cli(*args):
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ssl_course.cli import main; sys.exit(main())",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_list_shows_chapters_methods_datasets():
    p = run_cli("list")
    assert p.returncode == 0, p.stderr
    for word in ("01_why_ssl", "simclr", "fashion_mnist", "cifar10", "available"):
        assert word in p.stdout


def test_errors_are_one_line_with_exit_code_2(capsys):
    "Errors a user can fix print one line naming the fix and exit with 2, no traceback."
    assert main(["demo", "--profile", "fastest"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'fastest'" in err and "Traceback" not in err
    assert main(["pretrain", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_offline_dataset_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_COURSE_OFFLINE", "1")
    monkeypatch.setenv("SSL_COURSE_DATA_DIR", str(tmp_path))
    assert main(["demo", "--dataset", "stl10", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "'stl10' is not available" in err and "Fix:" in err


def test_settings_command(capsys):
    assert main(["settings", "--profile", "full"]) == 0
    out = capsys.readouterr().out
    assert "profile='full'" in out and "resnet18_cifar" in out


def test_helpers():
    assert parse_label_counts("10,1 5") == [1, 5, 10]
    with pytest.raises(ValueError):
        parse_label_counts("a")
    assert format_table([{"a": 1, "b": 0.5}]).splitlines() == ["a  b", "-  -----", "1  0.500"]
    assert len({c.notebook for c in CHAPTERS}) == len(CHAPTERS)


def test_demo_end_to_end_on_digits(tmp_path):
    """A shortened demo on the bundled digits: pretrains, compares, writes plot + report + encoder;
    --resume works."""
    out = tmp_path / "demo"
    args = [
        "demo",
        "--dataset",
        "digits",
        "--steps",
        "30",
        "--labels",
        "1,5",
        "--seeds",
        "1",
        "--out",
        str(out),
    ]
    p = run_cli(*args)  # with its progress bars, into a pipe: what a CI log or nohup captures
    assert p.returncode == 0, p.stderr[-3000:]
    log_lines = (p.stdout + p.stderr).replace("\r", "\n").splitlines()
    assert len(log_lines) < 60, f"{len(log_lines)} log lines:\n" + "\n".join(log_lines[:80])
    rep = json.loads((out / "report.json").read_text())
    assert (
        rep["dataset"] == "digits"
        and rep["labels_per_class"] == [1, 5]
        and rep["pretrain"]["steps"] == 30
    )
    assert (out / "label_efficiency.png").stat().st_size > 1000 and (
        out / "encoder.safetensors"
    ).exists()
    acc = {(r["method"], r["labels_per_class"]): r["accuracy"] for r in rep["rows"]}
    assert all(a > 0.2 for a in acc.values())  # above 10-class chance
    assert (
        "SimCLR (this run)" in p.stdout
        and "labels/class" in p.stdout
        and "label multiplier" in p.stdout
    )
    # the finished run resumes to the same place without training again
    p2 = run_cli(*args, "--resume")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert (
        json.loads((out / "report.json").read_text())["pretrain"]["last_loss"]
        == rep["pretrain"]["last_loss"]
    )


@pytest.mark.parametrize(
    "method",
    ["simclr", "moco", "byol", "barlow_twins", "vicreg", "simsiam", "swav", "deepcluster", "dino"],
)
def test_pretrain_every_joint_embedding_method(method, tmp_path, capsys):
    out = tmp_path / method
    assert (
        main(
            [
                "pretrain",
                "--method",
                method,
                "--dataset",
                "digits",
                "--steps",
                "3",
                "--batch-size",
                "32",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert (
        rep["method"] == method
        and rep["steps"] == 3
        and (out / "encoder.safetensors").stat().st_size > 0
    )
    assert 0.0 <= rep["knn_accuracy_100_per_class"] <= 1.0


def test_committed_demo_report_has_the_live_and_zoo_rows_and_their_multipliers():
    """reports/demo_quick.json (what chapter 08 prints) holds both SimCLR rows on the same draws,
    and claims that add up."""
    rep = json.loads(
        (Path(__file__).resolve().parents[1] / "reports" / "demo_quick.json").read_text()
    )
    methods = {r["method"] for r in rep["rows"]}
    live = "SimCLR (this run) + linear probe"
    zoo_rows = [m for m in methods if m.startswith("SimCLR (zoo")]
    assert live in methods and len(zoo_rows) == 1
    assert {
        "raw pixels + linear probe",
        "random encoder + linear probe",
        "supervised from scratch",
    } <= methods
    assert set(rep["label_multiplier"]) == {live, zoo_rows[0]}
    for k in rep["labels_per_class"]:
        seeds = {
            m: sorted(
                r["seed"] for r in rep["rows"] if r["method"] == m and r["labels_per_class"] == k
            )
            for m in methods
        }
        assert len(set(map(tuple, seeds.values()))) == 1 and len(seeds[live]) == rep["seeds"] == 3
    summary = {(r["method"], r["labels_per_class"]): r["mean"] for r in rep["summary"]}
    for c in rep["claims"]:
        assert c["met"] == (c["value"] >= c["required"])
        assert c["value"] == summary[(live, int(c["claim"].split(" at ")[1].split()[0]))]


BAD_ARGUMENTS = [
    (
        ["pretrain", "--method", "simclr", "--batch-size", "-8"],
        "--batch-size: must be >= 2, got -8",
    ),
    (["pretrain", "--method", "simclr", "--batch-size", "1"], "--batch-size: must be >= 2"),
    (["pretrain", "--method", "simclr", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["pretrain", "--method", "simclr", "--epochs", "-1"], "--epochs: must be >= 1"),
    (["pretrain", "--method", "simclr", "--steps", "ten"], "expected a whole number, got 'ten'"),
    (["pretrain", "--method", "simclr", "--lr", "-0.1"], "--lr: must be a positive number"),
    (["pretrain", "--method", "simclr", "--lr", "nan"], "--lr: must be a positive number"),
    (["pretrain", "--method", "simclr", "--train-images", "-5"], "--train-images: must be >= 0"),
    (["demo", "--seeds", "0"], "--seeds: must be >= 1"),
    (["demo", "--checkpoint-every", "0"], "--checkpoint-every: must be >= 1"),
    (["label-efficiency", "--seeds", "-2"], "--seeds: must be >= 1"),
]


@pytest.mark.parametrize(
    "argv, message", BAD_ARGUMENTS, ids=[" ".join(a[1:]) for a, _ in BAD_ARGUMENTS]
)
def test_bad_numbers_are_refused_before_any_work(argv, message, capsys):
    "argparse refuses them: one line naming the flag and the value, exit code 2, nothing trained."
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_library_calls_check_their_numbers_too(tmp_path):
    from ssl_course.cli import run_demo, run_pretrain

    with pytest.raises(ValueError, match="--batch-size must be a whole number >= 2, got -8"):
        run_pretrain("simclr", dataset="digits", batch_size=-8, out_dir=tmp_path)
    with pytest.raises(ValueError, match="--steps must be a whole number >= 1, got 0"):
        run_demo(dataset="digits", steps=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no label counts given"):
        run_demo(dataset="digits", labels_per_class="", out_dir=tmp_path)


def test_impossible_label_counts_fail_before_pretraining(capsys, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "digits", "--labels", "1,1000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "asks for 1000 labelled images per class" in err and "use counts <=" in err
    assert not (out / "checkpoints").exists()  # nothing was trained


def test_an_output_folder_that_cannot_be_written_fails_before_training(capsys, tmp_path):
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "inside"):
        argv = ["pretrain", "--method", "simclr", "--dataset", "digits", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(a_file) in err and "Traceback" not in err
    assert a_file.read_text() == "not a folder"


def test_a_read_only_output_folder_fails_before_training(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode: give the error a normal user would get
        real = tempfile.NamedTemporaryFile

        def denied(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == ro:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    argv = ["pretrain", "--method", "simclr", "--dataset", "digits", "--steps", "3"]
    assert main([*argv, "--out", str(ro)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write into --out {ro} (Permission denied)" in err and "Traceback" not in err
    assert list(ro.iterdir()) == []  # nothing was trained or written
    ro.chmod(0o755)


def test_debug_shows_the_traceback(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("")
    argv = ["pretrain", "--method", "simclr", "--dataset", "digits", "--out", str(a_file)]
    p = run_cli("--debug", *argv)
    assert p.returncode != 0 and "Traceback" in p.stderr and "is a file, not a folder" in p.stderr
    p = run_cli(*argv)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--debug" in p.stderr


def test_readme_demo_time_matches_the_committed_report():
    """README's "about 1.5 min" for `ssl-course demo` is the committed run of record's total time
    (within 30 s), so a slower or faster demo makes this go red until the README says so."""
    root = Path(__file__).resolve().parents[1]
    rep = json.loads((root / "reports" / "demo_quick.json").read_text())
    readme = (root / "README.md").read_text()
    assert "`ssl-course demo` (about 1.5 min on 2 CPU cores" in readme
    assert abs(rep["total_seconds"] - 90) <= 30 and "2 cores" in rep["hardware"]
