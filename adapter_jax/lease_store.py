"""Where a workdir lock's record lives: one small file, read and replaced only if it is still the version one
read, so that of two runs taking over a stale lock one wins. A local file is compared by its content, under a flock
of its folder; a gs:// object by its generation, through Cloud Storage's preconditions, which
gcsfs (epath) does not expose for a replacement; google-cloud-storage, a dependency of gcsfs, does.
"""

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

from etils import epath

from adapter_jax.workdir import is_remote, write_atomic


@dataclasses.dataclass(frozen=True)
class Stored:
    text: str
    version: Any  # what `replace` and `delete` compare: the text (a local file) or the generation (gs://)
    modified: float  # seconds since the epoch, when it was last written


class LeaseStore(Protocol):
    path: epath.Path

    def read(self) -> Stored | None: ...
    def create(self, text: str) -> Any | None: ...  # the new version; None if the record exists
    def replace(self, text: str, version: Any) -> Any | None: ...  # None if `version` is no longer the record's
    def renew(self, text: str, version: Any) -> Any | None: ...  # `replace` by its writer; OSError on failure
    def delete(self, version: Any) -> None: ...  # nothing if `version` is no longer the record's


def store_for(path: epath.Path) -> LeaseStore:
    return _ObjectStore(path) if is_remote(path) else _FileStore(path)


class _FileStore:
    """A local record: each read-compare-write holds an exclusive flock on the record's folder (held per open file,
    so it also keeps apart the threads of one process), and writes the record whole, so a reader never sees a
    part of one."""

    def __init__(self, path: epath.Path):
        self.path = path

    def read(self) -> Stored | None:
        try:
            with open(os.fspath(self.path), encoding="utf-8", errors="replace") as f:
                text = f.read()
                return Stored(text, text, os.fstat(f.fileno()).st_mtime)
        except FileNotFoundError:
            return None

    def create(self, text: str) -> str | None:
        with self._folder_locked():
            if self.path.exists():
                return None
            write_atomic(self.path, text)
        return text

    def replace(self, text: str, version: str) -> str | None:
        with self._folder_locked():
            current = self.read()
            if current is None or current.version != version:
                return None
            write_atomic(self.path, text)
        return text

    renew = replace  # a local write raises OSError itself

    def delete(self, version: str) -> None:
        with self._folder_locked():
            current = self.read()
            if current is not None and current.version == version:
                self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _folder_locked(self) -> Iterator[None]:
        folder = os.open(os.fspath(self.path.parent), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the flock


class _ObjectStore:
    def __init__(self, path: epath.Path):
        from google.cloud import storage

        self.path = path
        bucket, _, name = os.fspath(path).removeprefix("gs://").partition("/")
        self._blob_name = name
        self._bucket = storage.Client().bucket(bucket)

    def read(self) -> Stored | None:
        from google.api_core import exceptions

        while True:  # the object's metadata, then that very generation's content (unless it was replaced between)
            blob = self._bucket.get_blob(self._blob_name)
            if blob is None:
                return None
            try:
                text = blob.download_as_bytes(if_generation_match=blob.generation).decode("utf-8", errors="replace")
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                continue
            return Stored(text, blob.generation, blob.updated.timestamp() if blob.updated else time.time())

    def create(self, text: str) -> int | None:
        return self._upload(text, 0)

    def replace(self, text: str, version: int) -> int | None:
        return self._upload(text, version)

    def renew(self, text: str, version: int) -> int | None:
        """`replace`; Cloud Storage's errors (after the client's own retries) as OSError, as a file's would be."""
        from google.api_core import exceptions

        try:
            return self._upload(text, version)
        except exceptions.GoogleAPICallError as e:
            raise OSError(f"{self.path}: {e}") from e

    def delete(self, version: int) -> None:
        from google.api_core import exceptions

        try:
            self._bucket.blob(self._blob_name).delete(if_generation_match=version)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass

    def _upload(self, text: str, generation: int) -> int | None:
        from google.api_core import exceptions

        blob = self._bucket.blob(self._blob_name)
        try:
            blob.upload_from_string(text, content_type="application/json", if_generation_match=generation)
        except exceptions.PreconditionFailed:
            return None
        return blob.generation
