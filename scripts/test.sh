#!/usr/bin/env bash
# Set up (if needed) and run every test:
#   1. the library is in sync with the notebooks and the notebooks are clean (nbdev-export / nbdev-clean change nothing),
#      and ruff finds the notebooks, tests, benchmarks and scripts formatted and lint-free;
#   2. every notebook executed in the quick profile (nbdev-test on a copy in build/executed/, kept with its outputs),
#      with per-notebook timing;
#   3. pytest (tests/), including the classroom kit: student/ in sync, every lesson complete, and the slide decks
#      (built with the figures of step 2) opened offline in headless Chromium.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

echo "== 1/3 notebooks are the source: nbdev-export and nbdev-clean must not change tracked files"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  snapshot() { git diff -- nbs ssl_course; git status --porcelain --untracked-files=all -- nbs ssl_course; }
  before="$(snapshot)"
  nbdev-export
  nbdev-clean
  after="$(snapshot)"
  if [ "$before" != "$after" ]; then
    git --no-pager diff --stat -- nbs ssl_course
    git status --short -- nbs ssl_course
    echo "ERROR: ssl_course/ is out of sync with nbs/ or a notebook is not clean." >&2
    echo "       Run 'nbdev-export && nbdev-clean' and commit the result (never edit ssl_course/*.py by hand)." >&2
    exit 1
  fi
else
  echo "(not a git checkout: sync check skipped)"
fi

echo "== 1b/3 ruff: the code learners read is formatted and linted (pyproject.toml [tool.ruff]; lines <= 100)"
if ! ruff format --check nbs tests bench scripts || ! ruff check nbs tests bench scripts; then
  echo "ERROR: run 'ruff format nbs tests bench scripts && ruff check nbs tests bench scripts', fix what remains," >&2
  echo "       then 'nbdev-export && nbdev-clean' and commit." >&2
  exit 1
fi

echo "== 2/3 notebooks (quick profile; budget <= 90 s each on 2 CPU cores)"
start=$(date +%s)
rm -rf build/executed && mkdir -p build/executed && cp nbs/*.ipynb build/executed/
set +e
nbdev-test --n-workers 1 --timing --save build/executed 2>&1 | tee .nbdev-test.log
status=${PIPESTATUS[0]}
set -e
python - <<'PY'
import json, re, time
from ssl_course.core import hardware_summary
times = {n.removesuffix(".ipynb"): int(s) for n, s in re.findall(r"^(\S+\.ipynb): (\d+) secs", open(".nbdev-test.log").read(), re.M)}
for n, s in times.items():
    if s > 90: print(f"warning: {n} took {s} s, over the 90 s quick-profile budget")
# CI's timing file: `python scripts/update_times.py build/notebook_times.json` makes it the run of record
json.dump({"profile": "quick", "hardware": hardware_summary("cpu"), "date": time.strftime("%Y-%m-%d"), "seconds": times},
          open("build/notebook_times.json", "w"), indent=1)
print(f"timings: build/notebook_times.json ({len(times)} notebooks)")
PY
rm -f .nbdev-test.log
echo "notebooks: $(( $(date +%s) - start )) s"
if [ "$status" -ne 0 ]; then exit "$status"; fi

echo "== 3/3 pytest (with the executed chapters for the slide decks)"
export SSL_COURSE_EXECUTED_NBS="$PWD/build/executed"
if command -v apt-get >/dev/null 2>&1; then export SSL_COURSE_REQUIRE_BROWSER=1; fi
python -m pytest -q tests
