"""The times the chapters state come from the run of record (CI's timing file,
reports/notebook_times.json): a number typed by hand, or a notebook over the quick budget, fails
here."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "reports" / "notebook_times.json"
NOTEBOOKS = sorted(p.stem for p in (ROOT / "nbs").glob("[0-9][0-9]*.ipynb"))


def stated_time(name: str) -> int | None:
    cells = json.loads((ROOT / "nbs" / f"{name}.ipynb").read_text())["cells"][:4]
    m = re.search(
        r"Time: (under 1|\d+) s \(quick profile, 2 CPU cores; "
        r"run of record in `reports/notebook_times.json`\)",
        "".join("".join(c["source"]) for c in cells),
    )
    return None if m is None else 0 if m.group(1) == "under 1" else int(m.group(1))


def test_the_run_of_record_covers_every_notebook_within_budget():
    rec = json.loads(RECORD.read_text())
    assert rec["profile"] == "quick" and "cores" in rec["hardware"]
    assert set(NOTEBOOKS) <= set(rec["seconds"])
    over = {n: s for n, s in rec["seconds"].items() if s > 90}
    assert not over, f"over the 90 s quick-profile budget: {over}"


def test_times_measured_on_other_hardware_name_it():
    "A notebook timed by another full run (update_times.py --only) keeps that run's machine."
    rec = json.loads(RECORD.read_text())
    for name, where in rec.get("measured_elsewhere", {}).items():
        assert name in rec["seconds"] and "cores" in where["hardware"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", where["date"])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_a_chapter_states_the_time_of_the_run_of_record(name):
    secs = json.loads(RECORD.read_text())["seconds"][name]
    assert stated_time(name) == secs, (
        f"{name} must say 'Time: {secs} s ...' as measured; run "
        "`python scripts/update_times.py build/notebook_times.json` after scripts/test.sh"
    )


def test_the_instructor_guide_states_the_same_times():
    rec = json.loads(RECORD.read_text())
    guide = (ROOT / "slides" / "INSTRUCTOR_GUIDE.md").read_text()
    stated = {
        m.group(1): 0 if m.group(2) == "under 1" else int(m.group(2))
        for m in re.finditer(r"^\| (\S+) \| (under 1|\d+) s \|", guide, re.M)
    }
    assert set(NOTEBOOKS) <= set(stated), "every notebook has a row in the guide's time table"
    wrong = {n: (s, rec["seconds"][n]) for n, s in stated.items() if s != rec["seconds"].get(n)}
    assert not wrong, f"guide vs record {wrong}: run scripts/update_times.py"
    total = re.search(r"all notebooks together (\d+) s", guide)
    assert total and int(total.group(1)) == sum(rec["seconds"].values())
