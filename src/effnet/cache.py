"""Downloads and the local cache: fetch a URL with a size bound and a checksum, unpack archives safely, and
find a TF Hub module that is already on disk (effnet's cache or tensorflow_hub's) before downloading it.

Follows:
- CLIP `clip.py` `_download`: the checksum sits beside the URL, a download goes to a temporary file, and a
  cache hit is hashed again every time.
- tensorflow/hub `compressed_module_resolver.py` `_module_dir` and `resolver.py` `tfhub_cache_dir`: TF Hub keeps
  a module in `$TFHUB_CACHE_DIR/<sha1 of the handle string as the user passed it>/` (default
  `<tempdir>/tfhub_modules`), with `<dir>.descriptor.txt` ("Module: <handle>") beside it.
- Python's tarfile "data" filter (PEP 706): what a safe archive member is (no absolute paths, no `..`, no links
  leaving the folder, no devices).

Layout under `effnet_home()` (`$EFFNET_HOME`, default `~/.cache/effnet`):
    downloads/<file>        finished downloads (archives, .h5 files)
    modules/<handle>/       extracted hub modules, e.g. modules/google/efficientnet/b2/classification/1/

Environment: `EFFNET_HOME`, `EFFNET_OFFLINE=1` (never touch the network), `TFHUB_CACHE_DIR`.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from effnet.errors import CheckpointFormatError, DownloadError

if TYPE_CHECKING:
    from effnet.catalogue import HubModule

ENV_HOME = "EFFNET_HOME"
ENV_OFFLINE = "EFFNET_OFFLINE"
ENV_TFHUB_CACHE = "TFHUB_CACHE_DIR"
# A mirror of TF Hub archives (an internal server, an air-gapped copy): tried first, as <mirror>/<handle>.tar.gz
ENV_MIRROR = "EFFNET_HUB_MIRROR"

# The largest hub archive (V2-XL classification, ~210M float32 parameters) is under 1 GiB; 4 GiB leaves room
# while still stopping a runaway or hostile response.
DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MAX_MEMBERS = 100_000  # a SavedModel folder has a handful of files
_CHUNK = 1 << 20
_USER_AGENT = "effnet (+https://pypi.org/project/effnet/) Python-urllib"
# A folder is a complete module when it has this file (TF1 hub modules and TF2 SavedModels both do).
MODULE_MARKER = "saved_model.pb"


# --- Where things live ----------------------------------------------------------------------------------------

def effnet_home() -> Path:
    """effnet's cache root: `$EFFNET_HOME`, else `~/.cache/effnet`."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "effnet").expanduser()


def downloads_dir() -> Path:
    return effnet_home() / "downloads"


def module_dir(record: HubModule) -> Path:
    """Where effnet keeps the extracted module of `record`: `<home>/modules/<handle>/`."""
    return effnet_home() / "modules" / PurePosixPath(record.handle)


def is_offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


# --- Downloads ------------------------------------------------------------------------------------------------

def fetch(
    url: str,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    dest_name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download `url` into `<home>/downloads/<dest_name>` once, and give back its path.

    The bytes stream to a temporary file next to the destination, are hashed on the way, and are renamed into
    place only when complete and verified, so an interrupted or rejected download leaves nothing behind. A cache
    hit is hashed again when a checksum is given; a file that no longer matches is deleted and downloaded anew.
    `progress`: a tqdm bar on stderr; None = only when stderr is a terminal.
    """
    name = dest_name or default_file_name(url)
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"dest_name must be a plain file name, not {dest_name!r}")
    dest = downloads_dir() / name
    stale = False
    if dest.is_file():
        if sha256 is None and md5 is None:
            return dest
        actual = _hash_file(dest)
        if _matches(actual, sha256, md5):
            return dest
        dest.unlink()  # corrupted or replaced since it was cached
        stale = True
    if is_offline():
        note = " (the cached copy failed its checksum and was deleted)" if stale else ""
        raise DownloadError(
            f"{ENV_OFFLINE} is set and {dest.name} is not in the cache{note}. Download {url} yourself and save it "
            f"as {dest}, or unset {ENV_OFFLINE}."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _download(url, out, max_bytes=max_bytes, timeout=timeout, progress=progress)
        if not _matches(actual, sha256, md5):
            kind, expected = ("sha256", sha256) if not _matches(actual, sha256, None) else ("md5", md5)
            raise DownloadError(
                f"Checksum mismatch for {url}: expected {kind} {expected}, got {actual[kind]}. The download was "
                "deleted and nothing was cached. Try again; if it keeps failing, the file upstream changed or a "
                "proxy alters it: report it so that the checksum in effnet.catalogue can be checked."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def default_file_name(url: str) -> str:
    """A cache file name for a URL: readable, and unique even for names like `.../download`."""
    parts = urllib.parse.urlsplit(url)
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.basename(parts.path.rstrip("/"))) or "download"
    return f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:12]}-{base}"


def _download(url: str, out: IO[bytes], *, max_bytes: int, timeout: float, progress: bool | None) -> dict[str, str]:
    """Stream `url` into `out`, at most `max_bytes`; returns the sha256 and md5 hex digests of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise DownloadError(_too_big(url, max_bytes, f"the server announces {total} bytes"))
            bar = _progress_bar(url, total, progress)
            received = 0
            try:
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise DownloadError(_too_big(url, max_bytes, f"more than {max_bytes} bytes arrived"))
                    out.write(chunk)
                    for digest in digests.values():
                        digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and received != total:
                raise DownloadError(f"Download of {url} stopped after {received} of {total} bytes. Try again.")
    except urllib.error.HTTPError as error:
        raise DownloadError(f"Download of {url} failed: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"Could not download {url}: {reason}. Check the network connection and the free disk space."
        ) from error
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _too_big(url: str, max_bytes: int, what: str) -> str:
    return f"Refusing {url}: {what}, over the limit of {max_bytes} bytes (max_bytes=). Nothing was cached."


def _progress_bar(url: str, total: int | None, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a declared dependency, but a bar is not worth failing a download for
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=posixpath.basename(url)[:40],
                file=sys.stderr)


def _hash_file(path: Path) -> dict[str, str]:
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _matches(actual: dict[str, str], sha256: str | None, md5: str | None) -> bool:
    return (sha256 is None or actual["sha256"] == sha256.lower()) and (md5 is None or actual["md5"] == md5.lower())


# --- Safe extraction ------------------------------------------------------------------------------------------

def extract_archive(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_total_bytes: int = 2 * DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Unpack a .tar(.gz/.bz2/.xz) or .zip archive into the new folder `dest`, all or nothing.

    The format comes from the file's first bytes, not its name (Kaggle and tfhub.dev URLs have no extension).
    Members go into a temporary folder beside `dest`, which is renamed to `dest` at the end, so `dest` is either
    absent or complete. If `dest` already exists it is taken as an earlier, finished extraction and returned.
    Refused (CheckpointFormatError, nothing left behind): absolute paths, `..` components, symlinks or hard links
    that lead outside, devices and FIFOs, more than `max_members` members, more than `max_total_bytes` unpacked.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extracting"))
    try:
        with open(archive, "rb") as file:
            magic = file.read(4)
        try:
            if magic.startswith(b"PK"):
                _extract_zip(archive, tmp, _Budget(archive, max_total_bytes, max_members))
            elif tarfile.is_tarfile(archive):
                _extract_tar(archive, tmp, _Budget(archive, max_total_bytes, max_members))
            else:
                raise CheckpointFormatError(
                    f"{archive} is neither a tar nor a zip archive. Delete it and download it again."
                )
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise CheckpointFormatError(
                f"{archive} is corrupt or truncated ({error}). Delete it and download it again."
            ) from error
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same extraction first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


class _Budget:
    """Counts members and unpacked bytes against the limits; the error names the archive and the member."""

    def __init__(self, archive: Path, max_total_bytes: int, max_members: int):
        self.archive, self.max_total_bytes, self.max_members = archive, max_total_bytes, max_members
        self.total_bytes = self.members = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise CheckpointFormatError(
                f"{self.archive} has more than {self.max_members} members (at {name!r}); refusing to unpack it."
            )

    def take(self, nbytes: int, name: str) -> None:
        self.total_bytes += nbytes
        if self.total_bytes > self.max_total_bytes:
            raise CheckpointFormatError(
                f"{self.archive} unpacks to more than {self.max_total_bytes} bytes (at {name!r}); refusing it. "
                "Pass a larger max_total_bytes if the archive is trusted."
            )


def _refuse(archive: Path, name: str, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"Refusing to unpack {archive}: member {name!r} {why}. Nothing was extracted.")


def _member_path(archive: Path, name: str) -> PurePosixPath | None:
    """The member's path relative to the extraction folder; None for the folder itself ('.', './')."""
    if "\x00" in name:
        raise _refuse(archive, name, "has a NUL byte in its name")
    normalized = name.replace("\\", "/")  # a backslash is a separator to Windows tools; treat it as one
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise _refuse(archive, name, "has an absolute path")
    parts = [part for part in normalized.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "has a '..' component")
    return PurePosixPath(*parts) if parts else None


def _check_link(archive: Path, name: str, relative: PurePosixPath, link_target: str, *, hard: bool) -> None:
    """A link may only point at something inside the extraction folder."""
    if link_target.startswith("/") or re.match(r"^[A-Za-z]:", link_target):
        raise _refuse(archive, name, f"is a link to the absolute path {link_target!r}")
    # a symlink resolves from its own folder; a tar hard link names another member from the archive root
    base = "" if hard else posixpath.dirname(str(relative))
    resolved = posixpath.normpath(posixpath.join(base, link_target.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        raise _refuse(archive, name, f"is a link to {link_target!r}, outside the extraction folder")


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, after following any links already on disk, stays under `root`."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _prepare(archive: Path, name: str, root: Path, relative: PurePosixPath) -> Path:
    target = root / relative
    if not _inside(root, target.parent):
        raise _refuse(archive, name, "would be written through a link to outside the extraction folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()  # replace the link; never write through it
    return target


def _write(source: IO[bytes], target: Path, budget: _Budget, name: str) -> None:
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            budget.take(len(chunk), name)  # count what actually arrives, not what the header claims
            out.write(chunk)


def _extract_tar(archive: Path, root: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            budget.member(member.name)
            relative = _member_path(archive, member.name)
            if relative is None:
                continue
            if member.isdir():
                target = root / relative
                if not _inside(root, target):
                    raise _refuse(archive, member.name, "would be created through a link to outside")
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                if budget.total_bytes + member.size > budget.max_total_bytes:
                    budget.take(member.size, member.name)  # fail early on a member announced too big
                source = tar.extractfile(member)
                assert source is not None  # regular files always have data
                with source:
                    _write(source, _prepare(archive, member.name, root, relative), budget, member.name)
            elif member.issym():
                _check_link(archive, member.name, relative, member.linkname, hard=False)
                os.symlink(member.linkname, _prepare(archive, member.name, root, relative))
            elif member.islnk():
                _check_link(archive, member.name, relative, member.linkname, hard=True)
                linked = root / (_member_path(archive, member.linkname) or PurePosixPath("."))
                if not linked.is_file() or not _inside(root, linked):
                    raise _refuse(archive, member.name, f"is a hard link to {member.linkname!r}, not an earlier file")
                budget.take(linked.stat().st_size, member.name)
                shutil.copyfile(linked, _prepare(archive, member.name, root, relative))  # a copy, not a link
            else:
                raise _refuse(archive, member.name, "is a device, FIFO or other special file")


def _extract_zip(archive: Path, root: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member(info.filename)
            relative = _member_path(archive, info.filename)
            if relative is None:
                continue
            mode = info.external_attr >> 16  # unix st_mode when the zip was made on unix, else 0
            if stat.S_ISLNK(mode):
                link_target = zf.read(info).decode("utf-8")
                _check_link(archive, info.filename, relative, link_target, hard=False)
                os.symlink(link_target, _prepare(archive, info.filename, root, relative))
            elif info.is_dir():
                target = root / relative
                if not _inside(root, target):
                    raise _refuse(archive, info.filename, "would be created through a link to outside")
                target.mkdir(parents=True, exist_ok=True)
            elif stat.S_IFMT(mode) in (0, stat.S_IFREG):  # no type bits: a plain file from a non-unix zip
                with zf.open(info) as source:
                    _write(source, _prepare(archive, info.filename, root, relative), budget, info.filename)
            else:
                raise _refuse(archive, info.filename, "is a device, FIFO or other special file")


# --- TF Hub's cache -------------------------------------------------------------------------------------------

def tfhub_cache_root() -> Path:
    """Where tensorflow_hub caches modules: `$TFHUB_CACHE_DIR`, else `<tempdir>/tfhub_modules` (resolver.py)."""
    configured = os.environ.get(ENV_TFHUB_CACHE)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "tfhub_modules"


def tfhub_cache_dir_for(handle_url: str, cache_root: str | os.PathLike | None = None) -> Path:
    """The folder tensorflow_hub uses for `handle_url`: `<cache root>/<sha1(handle_url)>`.

    TF Hub hashes the handle exactly as the user passed it (compressed_module_resolver.py `_module_dir`), so
    `https://tfhub.dev/x/1` and `https://www.kaggle.com/models/...` give different folders for the same module.
    """
    root = Path(cache_root) if cache_root is not None else tfhub_cache_root()
    return root / hashlib.sha1(handle_url.encode("utf8")).hexdigest()


def tfhub_handle_urls(record: HubModule) -> tuple[str, ...]:
    """The handle strings a tensorflow_hub user is likely to have passed for `record` (each hashes differently)."""
    owner, model, framework, variation = record.kaggle_path.split("/")
    kaggle_frameworks = dict.fromkeys((framework, framework[0].upper() + framework[1:], framework.lower()))
    return tuple(dict.fromkeys([
        f"https://tfhub.dev/{record.handle}",
        f"http://tfhub.dev/{record.handle}",
        f"https://tfhub.dev/{record.handle}?tf-hub-format=compressed",
        f"https://hub.tensorflow.google.cn/{record.handle}",
        f"https://storage.googleapis.com/tfhub-modules/{record.handle}.tar.gz",
        *(f"https://www.kaggle.com/models/{owner}/{model}/{fw}/{variation}/{record.kaggle_version}"
          for fw in kaggle_frameworks),
        *(f"https://www.kaggle.com/models/{owner}/{model}/frameworks/{fw}/variations/{variation}/versions/"
          f"{record.kaggle_version}" for fw in kaggle_frameworks),
    ]))


def find_in_tfhub_cache(record: HubModule) -> Path | None:
    """A complete copy of `record` in tensorflow_hub's cache, if there is one (no network)."""
    root = tfhub_cache_root()
    if not root.is_dir():
        return None
    for handle_url in tfhub_handle_urls(record):
        candidate = tfhub_cache_dir_for(handle_url, root)
        if (candidate / MODULE_MARKER).is_file():
            return candidate
    # A spelling we did not guess: the descriptor beside each folder names the handle it was fetched from.
    from effnet.catalogue import find  # late import: catalogue does not need cache
    from effnet.errors import UnknownModelError

    for descriptor in root.glob("*.descriptor.txt"):
        try:
            first_line = descriptor.read_text(encoding="utf-8", errors="replace").splitlines()[0]
        except (OSError, IndexError):
            continue
        if not first_line.startswith("Module: "):
            continue
        try:
            if find(first_line.removeprefix("Module: ")).handle != record.handle:
                continue
        except UnknownModelError:
            continue
        candidate = root / descriptor.name.removesuffix(".descriptor.txt")
        if (candidate / MODULE_MARKER).is_file():
            return candidate
    return None


# --- Resolving a catalogue record to a folder -----------------------------------------------------------------

def resolve_module_dir(record: HubModule, *, progress: bool | None = None) -> Path:
    """The folder holding `record`'s module files (`saved_model.pb`, `variables/`), downloading it if needed.

    Looks in order at effnet's cache (`<home>/modules/<handle>/`), at tensorflow_hub's cache, and then downloads
    the archive from each of `record.urls` in turn. With `EFFNET_OFFLINE=1`, or when no mirror answers, raises
    one DownloadError that says which file to fetch and where to put it.
    """
    target = module_dir(record)
    if (target / MODULE_MARKER).is_file():
        return target
    cached = find_in_tfhub_cache(record)
    if cached is not None:
        return cached
    archive = downloads_dir() / _archive_name(record)
    if is_offline():
        if archive.is_file():  # an archive the user saved by hand, as the offline message suggests
            _install(record, archive, target)
            return target
        raise DownloadError(_manual_download_message(record, target, f"{ENV_OFFLINE} is set"))
    failures = []
    for url in candidate_urls(record):
        try:
            fetched = fetch(url, sha256=record.sha256, dest_name=archive.name, progress=progress)
            _install(record, fetched, target)
        except (DownloadError, CheckpointFormatError) as error:
            archive.unlink(missing_ok=True)  # a bad archive from one mirror must not shadow the next
            failures.append(f"  {url}: {error}")
            continue
        archive.unlink(missing_ok=True)  # the extracted folder is the cache; keeping both doubles the disk use
        return target
    raise DownloadError(_manual_download_message(record, target, "every mirror failed:\n" + "\n".join(failures)))


def candidate_urls(record: HubModule) -> tuple[str, ...]:
    """Where `record`'s archive may be fetched: the user's mirror first, then the upstream locations."""
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    own = (f"{mirror.rstrip('/')}/{record.handle}.tar.gz",) if mirror else ()
    return own + tuple(record.urls)


def _archive_name(record: HubModule) -> str:
    return record.handle.replace("/", "--") + ".tar.gz"


def _install(record: HubModule, archive: Path, target: Path) -> None:
    """Extract `archive` and move the folder that holds saved_model.pb to `target` (atomically)."""
    staging = target.parent / f".{target.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    extract_archive(archive, staging)
    try:
        root = _find_module_root(staging)
        if root is None:
            raise CheckpointFormatError(
                f"The archive for {record.handle} ({archive}) has no {MODULE_MARKER}; it is not a TF Hub module. "
                "Delete it and download it again."
            )
        try:
            os.rename(root, target)
        except OSError:
            if not (target / MODULE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _find_module_root(folder: Path) -> Path | None:
    """`folder` itself, or its single sub-folder, whichever holds saved_model.pb (some archives add a level)."""
    if (folder / MODULE_MARKER).is_file():
        return folder
    children = [child for child in folder.iterdir() if child.is_dir()]
    if len(children) == 1 and (children[0] / MODULE_MARKER).is_file():
        return children[0]
    return None


def _manual_download_message(record: HubModule, target: Path, reason: str) -> str:
    mirrors = "\n".join(f"  {url}" for url in candidate_urls(record))
    return (
        f"Cannot download the TF Hub module {record.handle} ({reason}).\n"
        f"Fetch the archive (a .tar.gz of the module folder) from one of:\n{mirrors}\n"
        f"and extract it into {target}/ so that {target / MODULE_MARKER} exists:\n"
        f"  mkdir -p {target} && tar -xzf <archive> -C {target}\n"
        f"or save the archive as {downloads_dir() / _archive_name(record)} and effnet extracts it.\n"
        f"A copy in tensorflow_hub's cache ({tfhub_cache_root()}) is found automatically."
    )

