"""file:// store: a directory tree, the embedded default. Puts are atomic (temp + rename).

The tree is private to its owner (blobstore/privatedir.py: directories 0700, files 0600):
it holds every file of every image, including those an image keeps from other users. A
store directory someone else owns or can write to is refused on the first put."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from blobstore import privatedir
from blobstore.base import ObjectInfo, check_key
from blobstore.errors import BlobNotFound, StoreError, StoreUnavailable, too_large


class LocalStore:
    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.fsync = fsync
        self._checked = False  # the root is checked (and created) by the first put

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str, limit: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if limit is not None and size > limit:
                    raise too_large(key, size, limit)
                data = f.read(size if limit is None else limit + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise StoreUnavailable(f"{self.url}: reading {key}: {exc.strerror}") from exc
        if limit is not None and len(data) > limit:  # grew since the fstat
            raise too_large(key, len(data), limit)
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(key) from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.parent / f".tmp-{path.name}-{secrets.token_hex(6)}"
        self._check_root()
        try:
            path.parent.mkdir(mode=privatedir.DIR_MODE, parents=True, exist_ok=True)
            with os.fdopen(privatedir.create(tmp), "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreUnavailable(f"{self.url}: writing {key}: {exc.strerror}") from exc

    def _check_root(self) -> None:
        if not self._checked:
            try:
                privatedir.ensure(self.root)
            except privatedir.UnsafePath as exc:
                raise StoreError(f"{self.url}: {exc}") from None
            self._checked = True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix if prefix.endswith("/") else (self.root / prefix).parent
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if name.startswith(".tmp"):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = (self.root / key).stat()
            except FileNotFoundError:
                continue
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()
