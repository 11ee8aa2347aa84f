"""Local image storage on a real filesystem: atomic writes, no escape from the root, clear URLs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from core.errors import PermanentError, TransientError
from core.models import GeneratedImage
from listener.storage.local import (
    LocalDirectoryStorage,
    StorageUnavailable,
    UnsafeStoragePath,
)

PATH = "user-1/chat-1/request-1.png"


def _image(data: bytes = b"\x89PNG first", output_format: str = "png") -> GeneratedImage:
    return GeneratedImage(data=data, output_format=output_format)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


async def test_store_writes_the_bytes_and_describes_them(tmp_path: Path) -> None:
    storage = LocalDirectoryStorage(tmp_path / "images", None)
    stored = await storage.store(PATH, _image(b"abc", "jpeg"))
    target = (tmp_path / "images" / PATH).resolve()
    assert target.read_bytes() == b"abc"
    assert stored.location == PATH
    assert stored.content_type == "image/jpeg"
    assert stored.size_bytes == 3
    assert stored.url == target.as_uri()
    assert stored.url.startswith("file:///")


async def test_stored_files_are_readable_by_a_web_server(tmp_path: Path) -> None:
    await LocalDirectoryStorage(tmp_path, None).store(PATH, _image())
    assert stat.S_IMODE((tmp_path / PATH).stat().st_mode) == 0o644


async def test_storing_twice_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """A retried attempt overwrites its earlier image: one file, the second content."""
    storage = LocalDirectoryStorage(tmp_path, None)
    await storage.store(PATH, _image(b"first"))
    await storage.store(PATH, _image(b"second, longer"))
    assert _files(tmp_path) == [PATH]
    assert (tmp_path / PATH).read_bytes() == b"second, longer"


async def test_public_url_joins_base_and_percent_encoded_segments(tmp_path: Path) -> None:
    storage = LocalDirectoryStorage(tmp_path, "https://cdn.example/images/")
    stored = await storage.store("user 1/chät/a#b?.png", _image())
    assert stored.url == "https://cdn.example/images/user%201/ch%C3%A4t/a%23b%3F.png"
    assert stored.location == "user 1/chät/a#b?.png"
    assert (tmp_path / "user 1" / "chät" / "a#b?.png").exists()


async def test_url_for_matches_what_store_returned(tmp_path: Path) -> None:
    for base_url in ("https://cdn.example", None):
        storage = LocalDirectoryStorage(tmp_path, base_url)
        stored = await storage.store(PATH, _image())
        assert storage.url_for(stored.location) == stored.url


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../outside.png",
        "a/../../outside.png",
        "a/../b.png",
        "a//b.png",
        "./b.png",
        "a/",
        "a\\..\\..\\b.png",
        "a/b\x00.png",
    ],
)
async def test_paths_that_are_not_plain_relative_paths_are_refused(
    tmp_path: Path, path: str
) -> None:
    root = tmp_path / "root"
    storage = LocalDirectoryStorage(root, None)
    with pytest.raises(UnsafeStoragePath) as caught:
        await storage.store(path, _image())
    assert isinstance(caught.value, PermanentError)
    with pytest.raises(UnsafeStoragePath):
        await storage.remove(path)
    assert _files(tmp_path) == []


async def test_symlink_leading_out_of_the_root_is_refused_for_store_and_remove(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim.png").write_bytes(b"keep me")
    (root / "link").symlink_to(outside, target_is_directory=True)
    storage = LocalDirectoryStorage(root, None)
    with pytest.raises(UnsafeStoragePath):
        await storage.store("link/new.png", _image())
    with pytest.raises(UnsafeStoragePath):
        await storage.remove("link/victim.png")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.png"]
    assert (outside / "victim.png").read_bytes() == b"keep me"


async def test_symlinked_root_itself_is_fine(tmp_path: Path) -> None:
    """Operators often point the image dir at a mounted volume through a symlink."""
    real = tmp_path / "volume"
    real.mkdir()
    (tmp_path / "images").symlink_to(real, target_is_directory=True)
    stored = await LocalDirectoryStorage(tmp_path / "images", None).store(PATH, _image())
    assert (real / PATH).exists()
    assert stored.url == (real / PATH).as_uri()


async def test_remove_deletes_and_is_idempotent(tmp_path: Path) -> None:
    storage = LocalDirectoryStorage(tmp_path, None)
    stored = await storage.store(PATH, _image())
    await storage.remove(stored.location)
    assert not (tmp_path / PATH).exists()
    await storage.remove(stored.location)
    await storage.remove("never/stored.png")


async def test_filesystem_failure_becomes_a_transient_error_with_a_generic_message(
    tmp_path: Path,
) -> None:
    """A file standing where a directory must go makes the write fail; nothing leaks to users."""
    (tmp_path / "user-1").write_bytes(b"not a directory")
    storage = LocalDirectoryStorage(tmp_path, None)
    with pytest.raises(StorageUnavailable) as caught:
        await storage.store(PATH, _image())
    error = caught.value
    assert isinstance(error, TransientError)
    assert isinstance(error.__cause__, OSError)
    assert "user-1" in str(error)
    assert str(tmp_path) not in error.public_message
    assert "user-1" not in error.public_message
