"Datasets, offline fallbacks, downloads and few-label splits (ssl_course.data)."

import gzip
import hashlib
import shutil
import urllib.request

import pytest
import torch

import ssl_course.data as data
from conftest import needs_fashion
from ssl_course.data import (
    ChecksumError,
    DataError,
    DatasetUnavailableError,
    ImageDataset,
    MultiViewDataset,
    download_url,
    find_or_download,
    list_datasets,
    load_dataset,
    sample_per_class,
    ssl_split,
)


def test_registry_lists_the_image_sets():
    names = {d.name for d in list_datasets("image")}
    assert {"digits", "fashion_mnist", "cifar10", "stl10"} <= names
    with pytest.raises(DataError, match="registered: "):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="has splits"):
        load_dataset("digits", "validation")


def test_digits_is_bundled_and_split_is_fixed():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (1, 8, 8)
    assert len(tr) + len(te) == 1797 and tr.is_labeled and te.num_classes == 10
    # the test split does not depend on the course seed and never overlaps the training split
    te2 = load_dataset("digits", "test", seed=123)
    assert torch.equal(te.images, te2.images)
    train_rows = {bytes(x.numpy()) for x in tr.images}
    dup = sum(bytes(x.numpy()) in train_rows for x in te.images)
    assert dup < 0.05 * len(
        te
    )  # digits has a few pixel-identical images; the split itself is disjoint by index


def test_sample_per_class_is_stratified_seeded_and_checked():
    labels = torch.arange(10).repeat_interleave(30)
    idx = sample_per_class(labels, 3, seed=1)
    assert torch.bincount(labels[idx]).tolist() == [3] * 10
    assert torch.equal(idx, sample_per_class(labels, 3, seed=1))
    assert not torch.equal(idx, sample_per_class(labels, 3, seed=2))
    frac = sample_per_class(labels, fraction=0.1, seed=0)
    assert torch.bincount(labels[frac]).tolist() == [3] * 10
    with pytest.raises(DataError, match="only 30 items"):
        sample_per_class(labels, 31)
    with pytest.raises(DataError, match="unlabelled"):
        sample_per_class(torch.full((5,), -1), 1)
    with pytest.raises(DataError, match="empty"):
        sample_per_class(torch.zeros(0, dtype=torch.long), 1)


def test_ssl_split_is_disjoint_and_hides_labels():
    tr = load_dataset("digits", "train")
    sp = ssl_split(tr, labels_per_class=5, seed=0)
    assert len(set(sp.labeled_idx.tolist()) & set(sp.unlabeled_idx.tolist())) == 0
    assert len(sp.labeled_idx) + len(sp.unlabeled_idx) == len(tr)
    assert torch.bincount(sp.labeled.labels).tolist() == [5] * 10
    assert (sp.unlabeled.labels == -1).all() and not sp.unlabeled.is_labeled
    full = ssl_split(tr, fraction=0.1, seed=0, unlabeled_includes_labeled=True)
    assert len(full.unlabeled) == len(tr)


def test_image_dataset_validates_input():
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.rand(4, 1, 8, 8), None)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.zeros(4, 8, dtype=torch.uint8), None)
    with pytest.raises(DataError, match="4 images but 3 labels"):
        ImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3))
    ds = ImageDataset(torch.full((4, 1, 8, 8), 255, dtype=torch.uint8), torch.arange(4))
    x, y = ds[2]
    assert x.dtype == torch.float32 and x.max() == 1.0 and y == 2


def test_multiview_dataset_makes_independent_views():
    ds = load_dataset("digits", "test")
    mv = MultiViewDataset(ds, lambda x: x.float() + torch.rand(()), n_views=3)
    views, y = mv[0]
    assert len(views) == 3 and y == ds.labels[0]
    assert not torch.equal(views[0], views[1])
    assert torch.allclose(
        views[0] - views[0].min(), ds.images[0].float() - ds.images[0].float().min()
    )


def _serve(tmp_path, payload: bytes, name="f.bin"):
    src = tmp_path / "server"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(payload)
    return src.as_uri() + "/" + name, hashlib.sha256(payload).hexdigest()


def test_download_verifies_and_never_keeps_partial_files(tmp_path):
    url, sha = _serve(tmp_path, b"hello dataset")
    cache = tmp_path / "cache"
    assert download_url(url, cache / "f.bin", sha, progress=False).read_bytes() == b"hello dataset"
    with pytest.raises(ChecksumError, match="discarded"):
        download_url(url, cache / "g.bin", "0" * 64, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["f.bin"]


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class Broken:
        headers = {"Content-Length": "100"}

        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("connection lost")
            return b"x" * 10

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Broken())
    cache = tmp_path / "cache"
    with pytest.raises(ConnectionResetError):
        download_url("https://example.invalid/x", cache / "x.bin", "0" * 64, progress=False)
    assert list(cache.iterdir()) == []


def test_find_or_download_prefers_cache_then_downloads_then_explains(tmp_path, monkeypatch):
    url, sha = _serve(tmp_path, b"abc", "a.bin")
    base = url.rsplit("/", 1)[0]
    got = find_or_download("toy", {"a.bin": sha}, [], base, tmp_path / "data", None, fix="do X")
    assert got["a.bin"] == tmp_path / "data" / "toy" / "a.bin"
    # a corrupt cached copy is reported, and offline mode names the fix
    got["a.bin"].write_bytes(b"abd")
    monkeypatch.setenv("SSL_COURSE_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match=r"(?s)corrupt: a.bin.*Fix: do X"):
        find_or_download("toy", {"a.bin": sha}, [], base, tmp_path / "data", None, fix="do X")
    # online again: the corrupt copy is replaced by a verified download
    monkeypatch.delenv("SSL_COURSE_OFFLINE")
    assert (
        find_or_download("toy", {"a.bin": sha}, [], base, tmp_path / "data", None, fix="do X")[
            "a.bin"
        ].read_bytes()
        == b"abc"
    )
    with pytest.raises(DatasetUnavailableError, match="download=False"):
        find_or_download("toy", {"a.bin": "1" * 64}, [], base, tmp_path / "data", False, fix="do X")


def test_online_only_datasets_fail_offline_with_instructions(tmp_path):
    for name, hint in (("cifar10", "cifar-10-binary.tar.gz"), ("stl10", "stl10_binary.tar.gz")):
        with pytest.raises(DatasetUnavailableError, match=hint):
            load_dataset(name, "train", data_dir=tmp_path, download=False)


def test_fashion_mnist_unavailable_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIRS", [tmp_path / "nowhere"])
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path, download=False)


@needs_fashion
def test_fashion_mnist_from_system_copy_and_from_cache(tmp_path, monkeypatch):
    te = load_dataset("fashion_mnist", "test", data_dir=tmp_path, download=False)
    assert (
        te.images.shape == (10000, 1, 28, 28) and torch.bincount(te.labels).tolist() == [1000] * 10
    )
    # copy the files into the course cache, remove the system folder: the cache copy is used
    cache = tmp_path / "fashion_mnist"
    cache.mkdir()
    for f in data.FASHION_GZ_SHA256:
        shutil.copy(data.FASHION_SYSTEM_DIRS[0] / f, cache / f)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIRS", [])
    te2 = load_dataset("fashion_mnist", "test", data_dir=tmp_path, download=False)
    assert torch.equal(te.images, te2.images)
    # a truncated cache file is detected, not half-read
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03short"))
    with pytest.raises(DatasetUnavailableError, match="corrupt"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path, download=False)


@needs_fashion
@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(max_items=-5), "max_items must be a whole number >= 0"),
        (dict(max_items=2.5), "max_items must be a whole number >= 0"),
        (dict(image_size=-28), "image_size must be a whole number >= 1"),
        (dict(image_size=0), "image_size must be a whole number >= 1"),
    ],
)
def test_a_negative_subset_or_size_is_refused_not_ignored(kwargs, bad):
    with pytest.raises(DataError, match=bad):  # -5 used to load every item without a word
        load_dataset("digits", "train", **kwargs)
    assert len(load_dataset("digits", "train", max_items=0)) == 1438  # 0 = every item


def test_max_items_is_a_stratified_subset():
    tr = load_dataset("fashion_mnist", "train", max_items=1000, download=False)
    assert len(tr) == 1000 and torch.bincount(tr.labels).tolist() == [100] * 10
