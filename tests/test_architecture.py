"""The one-way layering of the library, checked by parsing every module's imports
(top-level and inside functions): core -> data (with the speech, text and caption data modules)
-> building blocks (augment, backbones, vit) -> train -> methods -> evaluate/transfer/zoo -> cli."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ssl_course"
METHOD_MODULES = (
    "autoencoders",
    "pretext",
    "simclr",
    "moco",
    "byol",
    "redundancy",
    "simsiam",
    "clustering",
    "infomax",
    "dino",
    "mae",
    "jepa",
    "mlm",
    "wav2vec2",
    "clip",
)
LEVELS = {
    "core": 0,
    "data": 1,
    "speech_data": 1,
    "text_data": 1,
    "caption_data": 1,
    "augment": 2,
    "backbones": 2,
    "vit": 2,
    "train": 3,
    **{m: 4 for m in METHOD_MODULES},
    "evaluate": 5,
    "finetune": 5,
    "transfer": 5,
    "label_efficiency": 5,
    "case_studies": 5,
    "losses": 5,
    "zoo": 5,
    "classroom": 6,
    "cli": 7,
}


def imports_of(path: Path) -> set[str]:
    "The ssl_course modules a file imports, in any of the ways Python allows."
    mods = {p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module == "ssl_course":
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("ssl_course."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ssl_course."))
    return out & mods


def graph() -> dict[str, set[str]]:
    return {
        p.stem: imports_of(p) - {p.stem}
        for p in sorted(PKG.glob("*.py"))
        if not p.stem.startswith("_")
    }


def test_every_module_has_a_level():
    assert set(graph()) == set(LEVELS), "add the new module to LEVELS in tests/test_architecture.py"


@pytest.mark.parametrize("module", sorted(LEVELS))
def test_imports_only_go_down_the_layers(module):
    bad = {d for d in graph()[module] if LEVELS[d] > LEVELS[module]}
    assert not bad, (
        f"ssl_course.{module} (level {LEVELS[module]}) imports {sorted(bad)} from a higher level"
    )


def test_no_import_cycles():
    g = graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "active", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "active"
        for d in g[m]:
            visit(d, path + [m])
        state[m] = "done"

    for m in g:
        visit(m, [])


def test_only_the_command_line_imports_cli_and_classroom():
    g = graph()
    assert not [m for m, deps in g.items() if "cli" in deps], (
        "no library module may import ssl_course.cli"
    )
    assert [m for m, deps in g.items() if "classroom" in deps] in ([], ["cli"])


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """The parser is not blind: each import form is found (a checker that finds nothing would pass
    every test above)."""
    f = tmp_path / "m.py"
    f.write_text(
        "from .core import x\nfrom . import data\n"
        "import ssl_course.vit\nfrom ssl_course import train\n"
        "def g():\n    from ssl_course.cli import main\n"
    )
    assert imports_of(f) == {"core", "data", "vit", "train", "cli"}
