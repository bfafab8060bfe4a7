import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Each test sees the repo's settings.ini, no profile/device overrides, and its own reports
    folder."""
    for var in ("SSL_COURSE_PROFILE", "SSL_COURSE_DEVICE", "SSL_COURSE_SETTINGS", "IN_TEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def fashion_available() -> bool:
    from ssl_course.data import FASHION_SYSTEM_DIRS

    return any((d / "train-images-idx3-ubyte.gz").is_file() for d in FASHION_SYSTEM_DIRS)


needs_fashion = pytest.mark.skipif(
    not fashion_available(), reason="Debian package dataset-fashion-mnist not installed"
)
