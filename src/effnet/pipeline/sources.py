"""Source stage: command-line arguments -> the list of inputs, each once, in a stable order.

An argument is one of:
- an image file (any extension: a bad file is reported on its row, not skipped);
- a folder, walked recursively in sorted order, taking files with an image extension (`IMAGE_EXTENSIONS`) and
  skipping hidden files and folders (names starting with "."; e.g. macOS `._photo.jpg` resource forks). What
  the walk skips is counted in `Sources.skipped` (the CLI's summary says so); a folder it cannot list becomes
  an error row;
- a glob (`photos/**/*.jpg`), expanded in sorted order; matched folders are walked as above;
- a manifest, recognised by its extension: `.txt`/`.lst` (one path per line, `#` comments), `.csv`/`.tsv`, or
  `.parquet` (a column named `path`, or `path_column`). Relative entries are relative to the manifest's folder;
- a URL with a scheme fsspec knows (`s3://`, `gs://`, `https://`, `memory://` ...): file, folder, glob or
  manifest as above. URLs need the optional `fsspec` package (plus `s3fs`, `gcsfs` ... for the protocol).

An input that cannot be found still becomes an `Item` (with `error` set), so it gets its row in the output.
Inputs are de-duplicated by normalised path; the first spelling is kept.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import glob
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import EffnetError


def _pillow_reads_avif() -> frozenset[str]:
    from PIL import features

    return frozenset({".avif"}) if features.check("avif") else frozenset()


IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
    | _pillow_reads_avif()
)
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".tsv", ".parquet"})
MAX_MANIFEST_FIELD = 1 << 20  # bytes in one CSV field: a path is never this long; Python's default is 128 KiB
_GLOB_CHARS = re.compile(r"[*?\[]")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


@dataclass(frozen=True)
class Item:
    """One input: where it is, and its size and mtime (the resume key) as seen when it was listed."""

    path: str  # a local path as given or found, or a URL
    size: int | None = None  # bytes
    mtime_ns: int | None = None
    error: str | None = None  # set when the source already knows the input cannot be read

    @property
    def key(self) -> tuple[str, int | None, int | None]:
        """What makes an input "already done" on resume: same path, same size, same modification time."""
        return (self.path, self.size, self.mtime_ns)


def is_url(path: str) -> bool:
    return bool(_URL.match(path))


class Sources:
    """The source stage: `Sources(arguments)()` yields each input once."""

    def __init__(self, arguments: Sequence[str], path_column: str = "path"):
        if isinstance(arguments, (str, os.PathLike)):
            arguments = [arguments]
        self.arguments = [os.fspath(argument) for argument in arguments]
        self.path_column = path_column
        # what folder walks saw and did not take: "with extension .heic", "without extension" ... -> count
        self.skipped: collections.Counter[str] = collections.Counter()

    def __call__(self) -> Iterator[Item]:
        seen: set[str] = set()
        for argument in self.arguments:
            for item in self._expand(argument):
                identity = item.path if is_url(item.path) else os.path.normpath(os.path.abspath(item.path))
                if identity not in seen:
                    seen.add(identity)
                    yield item

    def _expand(self, argument: str) -> Iterator[Item]:
        if is_url(argument):
            yield from _UrlLister(argument, self.path_column)()
            return
        if os.path.isdir(argument):
            yield from _walk(argument, self.skipped)
        elif os.path.isfile(argument) and _extension(argument) in MANIFEST_EXTENSIONS:
            yield from (_entry_item(path) for path in _read_manifest(argument, self.path_column, open))
        elif os.path.exists(argument):
            yield _local_item(argument)
        elif _GLOB_CHARS.search(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                yield Item(argument, error="no file matches this pattern")
            for match in matches:
                if os.path.isdir(match):
                    yield from _walk(match, self.skipped)
                elif _extension(match) in IMAGE_EXTENSIONS:
                    yield _local_item(match)
        else:
            yield Item(argument, error="file not found")


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _local_item(path: str) -> Item:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return Item(path, error="file not found")
    except OSError as error:
        return Item(path, error=f"cannot read: {error.strerror or error}")
    except ValueError:  # os.stat: "embedded null byte"
        return Item(path, error="not a valid path (it contains a NUL byte)")
    if not os.path.isfile(path):
        return Item(path, stat.st_size, stat.st_mtime_ns, error="not a regular file")
    return Item(path, stat.st_size, stat.st_mtime_ns)


def _entry_item(path: str) -> Item:
    """A manifest entry: an image path or URL (never a folder or another manifest)."""
    return _UrlLister._item(path) if is_url(path) else _local_item(path)


def _walk(folder: str, skipped: collections.Counter) -> Iterator[Item]:
    unlistable: list[OSError] = []  # os.walk reports a folder it cannot list here, and goes on
    for root, dirs, files in os.walk(folder, onerror=unlistable.append):
        yield from _unlistable(unlistable)
        skipped["hidden (name starts with .)"] += sum(d.startswith(".") for d in dirs)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in-place: os.walk descends in this order
        for name in sorted(files):
            if name.startswith("."):
                skipped["hidden (name starts with .)"] += 1
            elif _extension(name) not in IMAGE_EXTENSIONS:
                skipped[f"with extension {_extension(name)}" if _extension(name) else "without extension"] += 1
            else:
                yield _local_item(os.path.join(root, name))
    yield from _unlistable(unlistable)


def _unlistable(errors: list[OSError]) -> Iterator[Item]:
    """A folder the walk could not list gets an error row (its images would otherwise vanish without a trace)."""
    while errors:
        error = errors.pop(0)
        reason = "permission denied" if isinstance(error, PermissionError) else error.strerror or str(error)
        yield Item(error.filename, error=f"cannot list this folder: {reason}")


def _read_manifest(path: str, path_column: str, opener) -> list[str]:
    """The entries of a manifest file, joined to the manifest's folder when relative."""
    import pyarrow as pa

    try:
        entries = _manifest_entries(path, path_column, opener)
    except UnicodeDecodeError as error:
        raise EffnetError(f"manifest {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}); save it as UTF-8") from None
    except PermissionError:
        raise EffnetError(f"manifest {path}: permission denied (cannot read it)") from None
    except (csv.Error, pa.ArrowException, OSError) as error:
        kind = "Parquet file" if _extension(path) == ".parquet" else "manifest"
        raise EffnetError(f"manifest {path} is not a readable {kind}: {error}") from None
    return [_join(path, entry) for entry in entries]


def _manifest_entries(path: str, path_column: str, opener) -> list[str]:
    extension = _extension(path)
    if extension == ".parquet":
        import pyarrow.parquet as pq

        with opener(path, "rb") as handle:
            table = pq.read_table(handle)
        if path_column not in table.column_names:
            raise EffnetError(
                f"manifest {path} has no column {path_column!r} (columns: {', '.join(table.column_names)}); "
                "name the column of paths with --path-column"
            )
        # a binary column holds paths as bytes: decode them as the file system would, never as "b'...'"
        entries = [os.fsdecode(value) if isinstance(value, bytes) else str(value)
                   for value in table.column(path_column).to_pylist() if value]
    elif extension in (".csv", ".tsv"):
        csv.field_size_limit(MAX_MANIFEST_FIELD)
        with opener(path, "r", newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if extension == ".tsv" else ",")
            if path_column not in (reader.fieldnames or []):
                raise EffnetError(
                    f"manifest {path} has no column {path_column!r} in its header "
                    f"(columns: {', '.join(reader.fieldnames or [])}); name the column of paths with --path-column"
                )
            entries = [row[path_column].strip() for row in reader if (row[path_column] or "").strip()]
    else:
        with opener(path, "r", encoding="utf-8-sig") as handle:
            lines = (line.strip() for line in handle)
            entries = [line for line in lines if line and not line.startswith("#")]
    return entries


def _join(manifest: str, entry: str) -> str:
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(manifest):
        scheme, rest = manifest.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(posixpath.dirname(rest), entry))
    return os.path.join(os.path.dirname(manifest), entry)


# --- URLs (fsspec, optional) ---------------------------------------------------------------------------------


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise EffnetError(
            "reading URLs needs the optional fsspec package (and the one for the protocol: s3fs for s3://, "
            "gcsfs for gs://): pip install fsspec s3fs gcsfs"
        ) from None
    return fsspec


def _filesystem(url: str):
    try:
        return _fsspec().core.url_to_fs(url)
    except ImportError as error:  # fsspec names the missing protocol package
        raise EffnetError(f"cannot read {url}: {error}") from None


def open_url(url: str) -> bytes:
    """The bytes of one URL (used by the decode stage)."""
    filesystem, path = _filesystem(url)
    with filesystem.open(path, "rb") as handle:
        return handle.read()


class _UrlLister:
    def __init__(self, url: str, path_column: str):
        self.url, self.path_column = url, path_column

    def __call__(self) -> Iterator[Item]:
        filesystem, path = _filesystem(self.url)
        if filesystem.isdir(path):
            yield from self._listing(filesystem, filesystem.find(path, detail=True))
        elif filesystem.isfile(path):
            if _extension(path) in MANIFEST_EXTENSIONS:
                for entry in _read_manifest(self.url, self.path_column, _fsspec().open):
                    yield _entry_item(entry)
            else:
                yield self._item(self.url)
        elif _GLOB_CHARS.search(path):
            found = filesystem.glob(path, detail=True)
            if not found:
                yield Item(self.url, error="no file matches this pattern")
            yield from self._listing(filesystem, found)
        else:
            yield Item(self.url, error="file not found")

    def _listing(self, filesystem, found: dict) -> Iterator[Item]:
        for path in sorted(found):
            info = found[path]
            name = posixpath.basename(path.rstrip("/"))
            if info.get("type") == "file" and not name.startswith(".") and _extension(name) in IMAGE_EXTENSIONS:
                yield Item(filesystem.unstrip_protocol(path), info.get("size"), _mtime_ns(info))

    @staticmethod
    def _item(url: str) -> Item:
        try:
            filesystem, path = _filesystem(url)
            info = filesystem.info(path)
        except FileNotFoundError:
            return Item(url, error="file not found")
        except EffnetError:
            raise
        except Exception as error:  # noqa: BLE001 - a URL that cannot be listed gets an error row
            return Item(url, error=f"cannot read: {error}")
        return Item(filesystem.unstrip_protocol(path), info.get("size"), _mtime_ns(info))


def _mtime_ns(info: dict) -> int | None:
    """fsspec back-ends name the modification time differently (mtime, LastModified, updated ...)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, str):
            try:
                return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return None
