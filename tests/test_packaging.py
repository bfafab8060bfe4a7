"""Packaging: the pins in environment.yml repeat pyproject.toml; the console script and nbdev config
exist."""

import re
import tomllib

from conftest import REPO


def _pins_from_env_yml() -> set[str]:
    text = (REPO / "environment.yml").read_text()
    return {m for m in re.findall(r'^\s*-\s*"([^"]+)"\s*$', text, re.M) if not m.startswith("-e")}


def test_environment_yml_repeats_pyproject_pins():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = set(meta["dependencies"]) | set(meta["optional-dependencies"]["dev"])
    assert _pins_from_env_yml() == pins


def test_project_configuration():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["project"]["scripts"]["ssl-course"] == "ssl_course.cli:main"
    assert (
        cfg["tool"]["nbdev"]["lib_path"] == "ssl_course"
        and cfg["tool"]["nbdev"]["nbs_path"] == "nbs"
    )
    assert "defaults" not in (REPO / "environment.yml").read_text().split("channels:")[1].split(
        "dependencies:"
    )[0].replace("nodefaults", "")
