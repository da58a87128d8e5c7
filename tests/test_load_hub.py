"""`effnet.load(handle)` end to end: catalogue -> download (a local HTTP server on 127.0.0.1 serving an archive
the test builds from a real Model Garden SavedModel) -> verify -> safe extraction -> convert once -> cache reuse."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

import effnet

from .conftest import photo_batch
from .test_cache import Server
from .tf_reference import model_garden_module

HANDLE = "tensorflow/efficientnet/b0/feature-vector/1"


@pytest.fixture(scope="module")
def module_archive(tmp_path_factory) -> tuple[bytes, Path]:
    """A real `tensorflow/efficientnet/b0/feature-vector` SavedModel (Model Garden code), as a .tar.gz."""
    folder = tmp_path_factory.mktemp("module") / "feature-vector"
    model_garden_module("efficientnet_b0", photo_batch(96), "feature-vector").save(str(folder), include_optimizer=False)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue(), folder


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    root = tmp_path / "served"
    (root / Path(HANDLE).parent).mkdir(parents=True)
    server = Server(root)
    monkeypatch.setenv("EFFNET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.setenv("EFFNET_HUB_MIRROR", server.url("").rstrip("/"))
    monkeypatch.delenv("EFFNET_OFFLINE", raising=False)
    yield server
    server.stop()


def test_download_convert_then_offline_cache_hit(mirror, module_archive, tmp_path, monkeypatch):
    archive, folder = module_archive
    mirror.put(f"{HANDLE}.tar.gz", archive)
    images = photo_batch(224)

    model = effnet.load(f"https://tfhub.dev/{HANDLE}")  # a URL form of the handle
    assert model.spec.source == HANDLE and model.spec.output == "features" and model.spec.native_size == 224
    converted = tmp_path / "home" / "converted" / HANDLE
    assert (converted / "model.safetensors").is_file() and (converted / "effnet.json").is_file()
    with torch.no_grad():
        features = model(images)
        direct = effnet.load(folder)(images)
    assert features.shape == (4, 1280)
    torch.testing.assert_close(features, direct, rtol=0, atol=0)  # conversion changes nothing

    mirror.stop()
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    again = effnet.load(HANDLE)
    with torch.no_grad():
        torch.testing.assert_close(again(images), features, rtol=0, atol=0)


def test_corrupt_archive_caches_nothing(mirror, module_archive, tmp_path):
    archive, _ = module_archive
    mirror.put(f"{HANDLE}.tar.gz", archive[: len(archive) // 2])
    with pytest.raises(effnet.DownloadError, match="mirror"):
        effnet.load(HANDLE)
    assert not (tmp_path / "home" / "converted" / HANDLE).exists()
    assert not (tmp_path / "home" / "modules" / HANDLE).exists()


def test_archive_escaping_its_folder_is_refused(mirror, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    mirror.put(f"{HANDLE}.tar.gz", buffer.getvalue())
    with pytest.raises(effnet.DownloadError, match=r"\.\./"):
        effnet.load(HANDLE)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_offline_with_nothing_cached_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    monkeypatch.delenv("EFFNET_HUB_MIRROR", raising=False)
    with pytest.raises(effnet.DownloadError) as error:
        effnet.load("google/efficientnet/b2/classification/1")
    message = str(error.value)
    assert "kaggle.com" in message and str(tmp_path / "home" / "modules") in message
