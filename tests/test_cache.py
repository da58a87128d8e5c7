"""Downloads, safe extraction and TF Hub cache reuse, against a real HTTP server on 127.0.0.1."""

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from effnet import cache
from effnet.catalogue import find
from effnet.errors import CheckpointFormatError, DownloadError

B2 = "google/efficientnet/b2/classification/1"
MODULE_FILES = {
    "saved_model.pb": b"\x08\x03 not really a graph",
    "tfhub_module.pb": b"\x08\x03",
    "variables/variables.index": b"index bytes",
    "variables/variables.data-00000-of-00001": bytes(range(256)) * 64,
}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.delenv("EFFNET_OFFLINE", raising=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server:
    """A static file server on 127.0.0.1:<free port>, serving `root`."""

    def __init__(self, root: Path):
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)

    def stop(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    running = Server(root)
    yield running
    running.stop()


def tar_gz(members: dict[str, bytes], prefix: str = "./") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with(*infos: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in infos:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def closed_port_url(name: str) -> str:
    with socket.socket() as probe:  # bind, then close: nothing listens on this port afterwards
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


# --- fetch ----------------------------------------------------------------------------------------------------

def test_fetch_extract_then_cache_hit_without_server(server, tmp_path):
    archive_bytes = tar_gz(MODULE_FILES)
    url = server.put("module.tar.gz", archive_bytes)
    path = cache.fetch(url, sha256=sha256(archive_bytes), progress=False)
    assert path.read_bytes() == archive_bytes
    assert path.parent == tmp_path / "home" / "downloads"

    extracted = cache.extract_archive(path, tmp_path / "out")
    for name, data in MODULE_FILES.items():
        assert (extracted / name).read_bytes() == data
    assert leftovers(tmp_path) == ["home", "out", "served"]  # no temporary folders left

    server.stop()
    again = cache.fetch(url, sha256=sha256(archive_bytes), progress=False)  # re-verified, no network
    assert again == path


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    good = tar_gz(MODULE_FILES)
    url = server.put("module.tar.gz", good[:-10] + b"corruption")
    with pytest.raises(DownloadError) as info:
        cache.fetch(url, sha256=sha256(good), progress=False)
    message = str(info.value)
    assert url in message and sha256(good) in message
    assert sha256(good[:-10] + b"corruption") in message
    assert leftovers(tmp_path / "home" / "downloads") == []


def test_md5_is_checked_too(server):
    url = server.put("weights.h5", b"h5 bytes")
    with pytest.raises(DownloadError, match="expected md5 0{32}"):
        cache.fetch(url, md5="0" * 32, progress=False)
    assert cache.fetch(url, md5=hashlib.md5(b"h5 bytes").hexdigest(), progress=False).read_bytes() == b"h5 bytes"


def test_cache_hit_with_bad_checksum_downloads_again(server):
    data = b"the real file"
    url = server.put("file.bin", data)
    path = cache.fetch(url, sha256=sha256(data), progress=False)
    path.write_bytes(b"bit rot")
    assert cache.fetch(url, sha256=sha256(data), progress=False).read_bytes() == data
    path.write_bytes(b"bit rot")
    server.stop()
    with pytest.raises(DownloadError):
        cache.fetch(url, sha256=sha256(data), progress=False)
    assert not path.exists()  # the corrupt copy is gone


def test_size_bound_refuses_download(server, tmp_path):
    url = server.put("big.bin", b"x" * 10_000)
    with pytest.raises(DownloadError, match="over the limit of 1000 bytes"):
        cache.fetch(url, max_bytes=1000, progress=False)
    assert leftovers(tmp_path / "home" / "downloads") == []


def test_dest_name_must_be_a_file_name():
    with pytest.raises(ValueError, match="plain file name"):
        cache.fetch("https://example.invalid/x", dest_name="../escape")


def test_http_error_names_url(server):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        cache.fetch(server.url("missing.tar.gz"), progress=False)
    assert server.url("missing.tar.gz") in str(info.value)


def test_offline_fetch_names_url_and_destination(monkeypatch):
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    url = "https://example.invalid/weights.h5"
    with pytest.raises(DownloadError) as info:
        cache.fetch(url, dest_name="weights.h5")
    assert url in str(info.value) and str(cache.downloads_dir() / "weights.h5") in str(info.value)


# --- extract_archive ------------------------------------------------------------------------------------------

def _refused(tmp_path, archive_bytes: bytes, match: str, **limits):
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(archive_bytes)
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointFormatError, match=match):
        cache.extract_archive(archive, dest, **limits)
    assert not dest.exists()
    assert leftovers(tmp_path) == ["hostile.tar"]  # no temporary folder left behind
    assert not (tmp_path.parent / "evil").exists()


def test_refuses_dotdot_member(tmp_path):
    _refused(tmp_path, tar_gz({"../evil": b"x"}, prefix=""), r"'\.\.' component")
    _refused(tmp_path, tar_gz({"variables/../../evil": b"x"}, prefix=""), r"'\.\.' component")


def test_refuses_absolute_member(tmp_path):
    _refused(tmp_path, tar_gz({"/tmp/evil": b"x"}, prefix=""), "absolute path")


def test_refuses_symlink_out(tmp_path):
    link = tarfile.TarInfo("variables")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    _refused(tmp_path, tar_with(link), "outside the extraction folder")
    absolute = tarfile.TarInfo("variables")
    absolute.type, absolute.linkname = tarfile.SYMTYPE, "/etc"
    _refused(tmp_path, tar_with(absolute), "absolute path")


def test_refuses_hardlink_out(tmp_path):
    link = tarfile.TarInfo("passwd")
    link.type, link.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    _refused(tmp_path, tar_with(link), "outside the extraction folder")


def test_refuses_device_file(tmp_path):
    device = tarfile.TarInfo("null")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    _refused(tmp_path, tar_with(device), "device")


def test_refuses_too_many_bytes_or_members(tmp_path):
    _refused(tmp_path, tar_gz({"a": b"x" * 5000}), "more than 1000 bytes", max_total_bytes=1000)
    _refused(tmp_path, tar_gz({f"f{i}": b"" for i in range(20)}), "more than 10 members", max_members=10)


def test_refuses_corrupt_archive(tmp_path):
    _refused(tmp_path, tar_gz(MODULE_FILES)[:200], "corrupt or truncated")


def test_symlink_inside_is_kept(tmp_path):
    target = tarfile.TarInfo("variables/variables.index")
    link = tarfile.TarInfo("alias")
    link.type, link.linkname = tarfile.SYMTYPE, "variables/variables.index"
    archive = tmp_path / "ok.tar"
    archive.write_bytes(tar_with(target, link, data={"variables/variables.index": b"idx"}))
    out = cache.extract_archive(archive, tmp_path / "out")
    assert (out / "alias").is_symlink() and (out / "alias").read_bytes() == b"idx"


def test_zip_extraction_and_refusal(tmp_path):
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as zf:
        for name, data in MODULE_FILES.items():
            zf.writestr(name, data)
    (tmp_path / "good.zip").write_bytes(good.getvalue())
    out = cache.extract_archive(tmp_path / "good.zip", tmp_path / "good")
    assert (out / "variables" / "variables.index").read_bytes() == b"index bytes"

    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil", b"x")
    (tmp_path / "bad.zip").write_bytes(bad.getvalue())
    with pytest.raises(CheckpointFormatError, match=r"'\.\.' component"):
        cache.extract_archive(tmp_path / "bad.zip", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# --- TF Hub cache and resolve_module_dir ----------------------------------------------------------------------

def test_tfhub_cache_dir_is_sha1_of_handle_url(tmp_path):
    # sha1("https://tfhub.dev/google/efficientnet/b2/classification/1"), computed outside Python
    assert cache.tfhub_cache_dir_for(f"https://tfhub.dev/{B2}").name == "caa8940e0a3a0154375d13064820dda992e11a17"
    assert cache.tfhub_cache_dir_for(f"https://tfhub.dev/{B2}").parent == tmp_path / "tfhub"
    kaggle = "https://www.kaggle.com/models/google/efficientnet/tensorFlow1/b2-classification/1"
    assert cache.tfhub_cache_dir_for(kaggle).name == "0bbb1d5ce5c153438793d13cdf7d30c963572f11"
    assert kaggle in cache.tfhub_handle_urls(find(B2))


def _offline_record(record):
    return dataclasses.replace(record, urls=(closed_port_url("never.tar.gz"),))


def _write_module(folder: Path):
    for name, data in MODULE_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("handle_url", [
    f"https://tfhub.dev/{B2}",
    "https://www.kaggle.com/models/google/efficientnet/TensorFlow1/b2-classification/1",
])
def test_resolve_finds_tfhub_cache_without_network(tmp_path, monkeypatch, handle_url):
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    folder = tmp_path / "tfhub" / hashlib.sha1(handle_url.encode()).hexdigest()
    _write_module(folder)
    assert cache.resolve_module_dir(_offline_record(find(B2))) == folder


def test_resolve_finds_tfhub_cache_by_descriptor(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    spelled = f"https://tfhub.dev/{B2}/"  # a spelling effnet does not hash, found through the descriptor file
    folder = tmp_path / "tfhub" / hashlib.sha1(spelled.encode()).hexdigest()
    _write_module(folder)
    Path(f"{folder}.descriptor.txt").write_text(f"Module: {spelled}\nDownload Time: now\n")
    assert cache.resolve_module_dir(_offline_record(find(B2))) == folder


def test_resolve_downloads_extracts_then_hits_cache(server, tmp_path):
    archive_bytes = tar_gz(MODULE_FILES)
    record = dataclasses.replace(
        find(B2), urls=(server.url("missing.tar.gz"), server.put("b2.tar.gz", archive_bytes)),
        sha256=sha256(archive_bytes),
    )
    folder = cache.resolve_module_dir(record, progress=False)
    assert folder == tmp_path / "home" / "modules" / "google/efficientnet/b2/classification/1"
    assert (folder / "variables" / "variables.index").read_bytes() == b"index bytes"
    assert leftovers(folder.parent) == ["1"]  # no staging folders
    assert leftovers(tmp_path / "home" / "downloads") == []  # the archive is not kept twice
    server.stop()
    assert cache.resolve_module_dir(record) == folder


def test_resolve_strips_single_top_folder(server):
    archive_bytes = tar_gz(MODULE_FILES, prefix="b2_module/")
    record = dataclasses.replace(find(B2), urls=(server.put("b2.tgz", archive_bytes),))
    folder = cache.resolve_module_dir(record, progress=False)
    assert (folder / "saved_model.pb").is_file()


def test_resolve_corrupt_archive_caches_nothing(server, tmp_path):
    good = tar_gz(MODULE_FILES)
    url = server.put("b2.tar.gz", good[:-10] + b"corruption")
    record = dataclasses.replace(find(B2), urls=(url,), sha256=sha256(good))
    with pytest.raises(DownloadError) as info:
        cache.resolve_module_dir(record, progress=False)
    assert "Checksum mismatch" in str(info.value) and url in str(info.value)
    assert not cache.module_dir(record).exists()
    assert leftovers(tmp_path / "home" / "downloads") == []


def test_resolve_offline_names_url_and_folder(monkeypatch):
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    record = find(B2)
    with pytest.raises(DownloadError) as info:
        cache.resolve_module_dir(record)
    message = str(info.value)
    assert "EFFNET_OFFLINE" in message
    assert record.urls[0] in message and f"https://tfhub.dev/{B2}?tf-hub-format=compressed" in message
    assert str(cache.module_dir(record)) in message
    assert "saved_model.pb" in message


def test_resolve_offline_uses_archive_saved_by_hand(monkeypatch):
    monkeypatch.setenv("EFFNET_OFFLINE", "1")
    record = find(B2)
    with pytest.raises(DownloadError) as info:
        cache.resolve_module_dir(record)
    saved_as = cache.downloads_dir() / f"{B2.replace('/', '--')}.tar.gz"
    assert str(saved_as) in str(info.value)
    saved_as.parent.mkdir(parents=True)
    saved_as.write_bytes(tar_gz(MODULE_FILES))
    assert (cache.resolve_module_dir(record) / "saved_model.pb").is_file()


def test_resolve_without_network_names_url_and_folder():
    record = _offline_record(find(B2))
    with pytest.raises(DownloadError) as info:
        cache.resolve_module_dir(record, progress=False)
    message = str(info.value)
    assert "every mirror failed" in message and record.urls[0] in message
    assert str(cache.module_dir(record)) in message


def test_effnet_home_default(monkeypatch):
    monkeypatch.delenv("EFFNET_HOME")
    assert cache.effnet_home() == Path.home() / ".cache" / "effnet"
    monkeypatch.setenv("EFFNET_HOME", "~/elsewhere")
    assert cache.effnet_home() == Path(os.path.expanduser("~/elsewhere"))
