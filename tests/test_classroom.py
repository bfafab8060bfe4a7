"""Classroom kit: decks build and open offline in a real browser, student notebooks are in sync,
every lesson is complete."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from ssl_course import classroom
from ssl_course.classroom import (
    ClassroomError,
    build_decks,
    check_chapter,
    check_chapters,
    lesson_notebooks,
    solution_exercises,
    student_notebook,
    write_student_notebooks,
)
from ssl_course.cli import CHAPTERS

REPO = Path(__file__).resolve().parents[1]
# CI sets this to the executed copies of the chapters (written by scripts/test.sh), so the decks
# carry their figures.
EXECUTED = Path(os.environ.get("SSL_COURSE_EXECUTED_NBS", REPO / "build" / "no-executed-copies"))


def expected_slides(nb_path: Path, executed: Path | None) -> int:
    """Slides a chapter's deck must have, counted straight from the notebook: title, objectives, one
    per `##` section (two when the executed chapter drew a figure in it), exercises, summary."""
    nb = nbformat.read(nb_path, as_version=4)
    ex = executed / nb_path.name if executed else None
    if ex and ex.is_file():
        exnb = nbformat.read(ex, as_version=4)
        if [(c.cell_type, c.source) for c in exnb.cells] == [
            (c.cell_type, c.source) for c in nb.cells
        ]:
            nb = exnb
    n, section, has_fig = 1, None, {}
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    n += "**What you will learn**" in md
    for c in nb.cells:
        if c.cell_type == "markdown":
            for h in re.findall(r"(?m)^## (.+)$", c.source):
                section = h.strip()
                has_fig[section] = False
        elif section is not None and any(
            "image/png" in o.get("data", {}) for o in c.get("outputs", [])
        ):
            has_fig[section] = True
    for title, fig in has_fig.items():
        n += 1 + (fig and title.lower() not in ("exercises", "summary"))
    return n


def chromium() -> str | None:
    for name in (os.environ.get("CHROME"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def browser(*args, url):
    "Headless Chromium with every host name unresolvable (no network), run on a local file URL."
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def decks(tmp_path_factory):
    out = tmp_path_factory.mktemp("decks")
    return build_decks(out=out, executed=EXECUTED if EXECUTED.is_dir() else out / "none")


def test_every_chapter_gets_a_self_contained_deck(decks):
    names = {p.stem for p in decks}
    assert names == {p.stem for p in lesson_notebooks()}
    assert (decks[0].parent / "index.html").is_file()
    for p in decks:
        page = p.read_text()
        assert "Reveal.initialize" in page and "<section>" in page
        # nothing to fetch from anywhere: no remote scripts, styles, fonts or images
        assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page), p.name
        assert not re.search(r"@import|url\(\s*['\"]?https?:", page), p.name
        nb = REPO / "nbs" / f"{p.stem}.ipynb"
        assert int(re.search(r'data-slide-count="(\d+)"', page).group(1)) == expected_slides(
            nb, EXECUTED
        ), p.name


needs_browser = pytest.mark.skipif(
    chromium() is None and not os.environ.get("SSL_COURSE_REQUIRE_BROWSER"),
    reason="no Chromium here (Debian: apt-get install chromium; scripts/setup.sh does it)",
)


@needs_browser
def test_decks_open_offline_in_a_real_browser(decks, tmp_path):
    assert chromium(), (
        "SSL_COURSE_REQUIRE_BROWSER is set but no chromium is installed: apt-get install chromium"
    )
    for p in decks:
        dom = browser("--dump-dom", url=p.as_uri()).stdout
        ready = re.search(r'data-deck-ready="(\d+)"', dom)
        assert ready, f"{p.name}: reveal.js did not initialise offline"
        assert int(ready.group(1)) == expected_slides(REPO / "nbs" / f"{p.stem}.ipynb", EXECUTED), (
            p.name
        )
        for slide in (0, 1):
            shot = tmp_path / f"{p.stem}-{slide}.png"
            browser("--window-size=1280,720", f"--screenshot={shot}", url=f"{p.as_uri()}#/{slide}")
            img = np.asarray(Image.open(shot).convert("L"), dtype=float)
            assert img.shape == (720, 1280)
            ink = (img < 128).mean()  # dark pixels: text, equations, figures
            assert img.std() > 10 and ink > 0.002, (
                f"{p.name} slide {slide} looks blank (ink {ink:.4f})"
            )


def test_solution_cells_are_recognised():
    code = lambda s: nbformat.v4.new_code_cell(s)
    assert solution_exercises(code("#| hide\n# Exercise 2 solution (short run in CI):\nx = 1")) == [
        2
    ]
    assert solution_exercises(
        code("#| hide\n# Exercise 1 and 3 solution sketches: both train\n")
    ) == [1, 3]
    assert solution_exercises(
        code("# Exercise 1 solution: a\nx=1\n# Exercise 4 solution sketch: b")
    ) == [1, 4]
    assert solution_exercises(code("# exercise helpers\nx = 1")) == []
    assert solution_exercises(nbformat.v4.new_markdown_cell("# Exercise 1 solution")) == []


def test_student_notebooks_drop_solutions_and_keep_everything_else():
    src = nbformat.read(REPO / "nbs" / "10_autoencoders.ipynb", as_version=4)
    stu = student_notebook(src)
    assert len(stu.cells) == len(src.cells)
    sols = [i for i, c in enumerate(src.cells) if solution_exercises(c)]
    assert sols
    for i, (a, b) in enumerate(zip(src.cells, stu.cells)):
        if i in sols:
            assert "your answer here" in b.source and "fit(" not in b.source
        else:
            assert a.source == b.source
    assert all(c.get("outputs", []) == [] for c in stu.cells if c.cell_type == "code")


def test_student_folder_is_in_sync_with_the_chapters():
    stale = write_student_notebooks(check=True)
    assert not stale, f"run `ssl-course student` and commit: out of date {[p.name for p in stale]}"


def test_every_lesson_is_complete():
    lessons = [
        c.notebook
        for c in CHAPTERS
        if c.kind == "lesson" and (REPO / "nbs" / f"{c.notebook}.ipynb").exists()
    ]
    assert len(lessons) >= 8
    problems = check_chapters()
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())


def test_the_check_catches_what_is_missing(tmp_path):
    nb = nbformat.read(REPO / "nbs" / "12_simclr.ipynb", as_version=4)
    assert check_chapter(REPO / "nbs" / "12_simclr.ipynb") == []
    nb.cells = [c for c in nb.cells if not solution_exercises(c)]
    for c in nb.cells:
        if "**Quiz" in c.source:
            c.source = c.source.split("**Quiz")[0]  # keep the exercises, drop the quiz
    nbformat.write(nb, tmp_path / "12_broken.ipynb")
    probs = " ".join(check_chapter(tmp_path / "12_broken.ipynb"))
    assert "no quiz" in probs and "no solution cell" in probs and "exercises under" not in probs
    # expected results: asserted claims about the run, or quoted numbers; a lesson with neither is
    # flagged
    nb = nbformat.read(REPO / "nbs" / "01_why_ssl.ipynb", as_version=4)
    assert check_chapter(REPO / "nbs" / "01_why_ssl.ipynb") == []
    for c in nb.cells:
        if c.cell_type == "code":
            c.source = "\n".join(
                l for l in c.source.split("\n") if not re.search(r"#.*claim", l, re.I)
            )
        else:
            c.source = re.sub(r"\d\.\d\d", "x", c.source)
    nbformat.write(nb, tmp_path / "01_unchecked.ipynb")
    assert "no expected quick-profile results" in " ".join(
        check_chapter(tmp_path / "01_unchecked.ipynb")
    )


def test_bad_input_names_the_fix(tmp_path):
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text("[course]\n")
    with pytest.raises(ClassroomError, match="npm pack reveal.js"):
        classroom.reveal_assets(tmp_path)
    (tmp_path / "nbs" / "12_bad.ipynb").write_text("{not json")
    with pytest.raises(ClassroomError, match="not a readable notebook"):
        classroom.outline(tmp_path / "nbs" / "12_bad.ipynb")
    with pytest.raises(ClassroomError, match="no course checkout"):
        classroom.course_root("/")
    with pytest.raises(ClassroomError, match="no chapter matches"):
        build_decks(["99_nothing"])
