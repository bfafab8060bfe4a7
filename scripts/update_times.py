"""Make a CI timing file the run of record: copy it to reports/notebook_times.json and write each
notebook's "Time: N s" line from it (the times a chapter states are measured, never typed;
tests/test_times.py checks them).

    python scripts/update_times.py build/notebook_times.json      # written by scripts/test.sh
    python scripts/update_times.py build/notebook_times.json --only 14c_clustering

`--only NAME ...` takes just those notebooks' times from the file into the existing record (a new
chapter timed by a full run on other hardware); the record then names that run's hardware and date
for them under "measured_elsewhere", so every number keeps the machine that measured it.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIME_RE = re.compile(
    r"Time: (?:about |under )?\d+ s(?: \([^)]*\)| in either profile)?"
    r"|Time: a few seconds(?: \([^)]*\))?"
)
RECORD = "reports/notebook_times.json"
GUIDE = "slides/INSTRUCTOR_GUIDE.md"


def time_phrase(seconds: int) -> str:
    shown = "under 1" if seconds < 1 else str(seconds)  # the timing file counts whole seconds
    return f"Time: {shown} s (quick profile, 2 CPU cores; run of record in `{RECORD}`)"


def write_guide_times(rec: dict) -> None:
    "The instructor guide's time table and its total, from the same record."
    guide = ROOT / GUIDE
    text = guide.read_text()
    for name, secs in rec["seconds"].items():
        shown = "under 1" if secs < 1 else str(secs)
        row = re.compile(rf"^\| {re.escape(name)} \| [^|]*\|", re.M)
        text, n = row.subn(f"| {name} | {shown} s |", text, count=1)
        if not n:
            print(f"note: {GUIDE} has no row for {name}")
    total = sum(rec["seconds"].values())
    text = re.sub(
        r"machine, [0-9-]+; all notebooks together \d+ s",
        f"machine, {rec['date']}; all notebooks together {total} s",
        text,
    )
    guide.write_text(text)


def merge(record: dict, run: dict, names: list[str]) -> dict:
    "The record with `names` timed by `run` (another full run), and that run's machine noted."
    missing = [n for n in names if n not in run["seconds"]]
    if missing:
        sys.exit(f"the timing file has no time for {', '.join(missing)}")
    out = {**record, "seconds": dict(record["seconds"])}
    elsewhere = dict(record.get("measured_elsewhere", {}))
    for n in names:
        out["seconds"][n] = run["seconds"][n]
        elsewhere[n] = {"hardware": run["hardware"], "date": run["date"]}
    out["measured_elsewhere"] = elsewhere
    return out


def main(path: str, only: list[str] | None = None) -> None:
    rec = json.loads(Path(path).read_text())
    if not rec.get("seconds"):
        sys.exit(f"{path} holds no notebook times; run scripts/test.sh first")
    if only:
        rec = merge(json.loads((ROOT / RECORD).read_text()), rec, only)
    (ROOT / RECORD).write_text(json.dumps(rec, indent=1) + "\n")
    for name, secs in sorted(rec["seconds"].items()):
        nb_path = ROOT / "nbs" / f"{name}.ipynb"
        if not nb_path.is_file():
            continue
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"][:4]:
            src = "".join(cell["source"])
            new, n = TIME_RE.subn(time_phrase(secs), src, count=1)
            if n:
                cell["source"] = new.splitlines(True)
                break
        else:
            print(f"note: {name} has no 'Time:' line in its first cells")
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    write_guide_times(rec)
    print(
        f"wrote {RECORD}, {GUIDE}'s time table and the Time lines of "
        f"{len(rec['seconds'])} notebooks; now run nbdev-clean and ssl-course student"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    only = args[args.index("--only") + 1 :] if "--only" in args else None
    args = args[: args.index("--only")] if "--only" in args else args
    main(args[0] if args else "build/notebook_times.json", only)
