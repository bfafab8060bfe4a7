"The ssl-course command line (ssl_course.cli)."

import json
import subprocess
import sys
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
        "--no-progress",
    ]
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
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


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "dino"])
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
