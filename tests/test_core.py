"Settings, profiles, devices and seeding (ssl_course.core)."

import configparser

import pytest
import torch

from conftest import REPO
from ssl_course.core import (
    DEFAULT_SETTINGS,
    Budget,
    SettingsError,
    find_settings_file,
    get_device,
    load_settings,
    parse_value,
    seed_everything,
)


def _sections(cp):
    return {s: dict(cp.items(s)) for s in cp.sections()}


def test_built_in_defaults_match_settings_ini():
    "The package's fallback settings (used outside the repo) must not drift from settings.ini."
    a, b = configparser.ConfigParser(), configparser.ConfigParser()
    a.read(REPO / "settings.ini")
    b.read_string(DEFAULT_SETTINGS)
    assert _sections(a) == _sections(b)


def test_repo_settings_found_from_anywhere(tmp_path):
    assert find_settings_file(tmp_path) in (None, REPO / "settings.ini")
    s = load_settings()
    assert s.profile == "quick" and s.budget.image_size == 28 and s.source == REPO / "settings.ini"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"profile": "fastest"}, "choose one of"),
        ({"device": "tpu"}, "use one of auto, cpu"),
        ({"device": "cuda:x"}, "cuda:x"),
        ({"steps_per_galaxy": 3}, "unknown budget key"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(**kwargs)


def test_environment_overrides_and_in_test_forces_quick(monkeypatch):
    monkeypatch.setenv("SSL_COURSE_PROFILE", "full")
    assert load_settings().profile == "full"
    monkeypatch.setenv("IN_TEST", "1")
    assert load_settings().profile == "quick"
    monkeypatch.delenv("IN_TEST")
    monkeypatch.setenv("SSL_COURSE_PROFILE", "nope")
    with pytest.raises(SettingsError, match="SSL_COURSE_PROFILE"):
        load_settings()


def test_broken_settings_files(tmp_path):
    bad = tmp_path / "settings.ini"
    bad.write_text("this is not = an ini [file\n")
    with pytest.raises(SettingsError, match="not a valid INI"):
        load_settings(bad)
    bad.write_text("[quick]\nsteps = 3\n")
    with pytest.raises(SettingsError, match=r"\[course\]"):
        load_settings(bad)


def test_parse_value_and_budget_length():
    assert (
        parse_value("2e-3") == 0.002 and parse_value("off") is False and parse_value("x y") == "x y"
    )
    assert Budget(simclr_steps=7, steps=300).length("simclr") == {"steps": 7}
    assert Budget(simclr_steps=0, steps=0, epochs=200).length("simclr") == {"epochs": 200}
    with pytest.raises(SettingsError, match="neither"):
        Budget(steps=0).length()
    with pytest.raises(AttributeError, match="no setting 'nope'"):
        Budget(steps=1).nope


def test_device_selection():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="CUDA"):
            get_device("cuda")


def test_seed_everything_is_reproducible():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    b = torch.randn(5)
    seed_everything(4)
    c = torch.randn(5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _settings_with(tmp_path, section: str, key: str, value: str | None):
    "The repository's settings.ini with one line of `section` changed (value None: removed)."
    lines, current = [], None
    for line in (REPO / "settings.ini").read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        if current == section and line.split("=")[0].strip() == key:
            if value is None:
                continue
            line = f"{key} = {value}"
        lines.append(line)
    path = tmp_path / "settings.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("course", "deterministic", "maybe", "deterministic = 'maybe' in [course]"),
        ("quick", "simclr_batch_size", "lots", "simclr_batch_size = 'lots' in [quick] of"),
        ("quick", "image_size", "-28", "image_size = -28 in [quick]"),
        ("full", "batch_size", "0", "batch_size = 0 in [full]"),
        ("quick", "steps", "12.5", "must be a whole number"),
        ("quick", "steps", None, "[quick] of"),
    ],
    ids=["bool", "text-for-number", "negative", "zero-batch", "fraction", "missing"],
)
def test_bad_settings_name_the_key_the_file_and_the_fix(tmp_path, section, key, value, message):
    path = _settings_with(tmp_path, section, key, value)
    with pytest.raises(SettingsError) as e:
        load_settings(path, profile=section if section != "course" else None)
    assert message in str(e.value) and str(path) in str(e.value)
    if value is None:
        assert "lacks steps" in str(e.value) and "copy these keys" in str(e.value)


def test_the_shipped_settings_pass_their_own_checks():
    for profile in ("quick", "full"):
        assert load_settings(profile=profile).budget.image_size > 0
