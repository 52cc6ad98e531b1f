"""Files to and from tasks: how a shell task declares them, and how a slot stages them.

Inputs (``Executor.shell(..., inputs={NAME: SOURCE})``), placed in the task's fresh working
directory under NAME (a relative path) before the command runs:

* ``bytes``: inline, travelling inside the task (at most ``INLINE_FILE_BYTES`` each);
* ``"s3://bucket/key"``: downloaded from S3 through the worker's cache;
* any other ``str``: a path on a file system the workers share (symlinked, not copied).

Outputs (``outputs=[NAME, ...]`` or ``{NAME: DEST}``), collected after the command exits 0:
DEST ``""`` returns the file inline in ``ShellResult.files`` (at most
``INLINE_FILE_BYTES``), ``"s3://bucket/key"`` uploads it. A missing input or output, or an
inline output over the limit, fails the task with a ``StagingError`` naming the file.

S3 goes through boto3: credentials from the usual chain (instance profile on EC2),
``AWS_ENDPOINT_URL`` honoured (tests point it at moto), standard retries, and boto3's
managed transfers (multipart above 8 MiB) both ways. An object's identity for the cache
is its version id, or its ETag in an unversioned bucket; in a versioned bucket downloads
are pinned to the version.

Links: the slot walks the task's directory by file descriptor and follows no symbolic link
there, in either direction. Each directory on a file's path is opened with ``O_NOFOLLOW``;
an input is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (it never replaces or writes
through anything already there); an output is opened with ``O_NOFOLLOW`` and must be a
regular file. So a shared input (itself a symlink), or a link the task made
(``ln -s /etc/passwd out.txt``), cannot lead a file outside the task's directory. Input
names that are the same file once normalised (``a`` and ``./a``), or one under another
(``d`` and ``d/f``), are refused, by the client and again by the slot.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from typing import IO, Any, Iterable, Mapping, Sequence

from zfalkon.cache import DataCache
from zfalkon.constants import INLINE_FILE_BYTES
from zfalkon.errors import SerializationError

INLINE, S3, PATH = 0, 1, 2  #: input kinds, as encoded in the task

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the task left under an output's name must not hang the slot.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class StagingError(Exception):
    """An input could not be placed or an output collected (the task fails with it)."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or os.path.isabs(name) or \
            ".." in name.split("/") or "\0" in name or os.path.normpath(name) == ".":
        raise SerializationError(f"file name {name!r} must be a relative path inside the "
                                 "task's directory (no '..')")
    return name


def _clash(names: Iterable[str]) -> str:
    """Why these input names cannot all be placed ("" if they can): two of them are the
    same file once normalised, or one lies under another (``d`` and ``d/f``)."""
    seen: dict[str, str] = {}
    for name in names:
        key = os.path.normpath(name)
        if key in seen:
            return f"inputs {seen[key]!r} and {name!r} are the same file"
        seen[key] = name
    for key, name in seen.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            above = seen.get("/".join(parts[:i]))
            if above is not None:
                return f"input {name!r} would be inside input {above!r}"
    return ""


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket or not key:
        raise SerializationError(f"{url!r} is not s3://bucket/key")
    return bucket, key


def encode_inputs(inputs: Mapping[str, bytes | str]) -> list[list]:
    """``[[name, kind, value], ...]`` for a task blob; raises SerializationError."""
    clash = _clash(_check_name(name) for name in inputs)
    if clash:
        raise SerializationError(clash)
    out = []
    for name, source in inputs.items():
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if len(data) > INLINE_FILE_BYTES:
                raise SerializationError(
                    f"inline input {name!r} is {len(data)} bytes, over the "
                    f"{INLINE_FILE_BYTES} byte limit; put it in S3 and pass 's3://...'")
            out.append([name, INLINE, data])
        elif isinstance(source, str) and source.startswith("s3://"):
            split_s3(source)
            out.append([name, S3, source])
        elif isinstance(source, (str, os.PathLike)):
            out.append([name, PATH, os.fspath(source)])
        else:
            raise SerializationError(f"input {name!r}: give bytes, 's3://bucket/key' or a "
                                     f"path, not {type(source).__name__}")
    return out


def encode_outputs(outputs: Sequence[str] | Mapping[str, str]) -> list[list]:
    """``[[name, dest], ...]``: dest ``""`` inline, else an ``s3://`` URL."""
    pairs = outputs.items() if isinstance(outputs, Mapping) else ((n, "") for n in outputs)
    out = []
    for name, dest in pairs:
        _check_name(name)
        if dest:
            split_s3(dest)
        out.append([name, dest or ""])
    return out


def locality(inputs: Mapping[str, bytes | str] | None) -> str:
    """The data key the broker's data-aware dispatch uses: the first S3 input, or ""."""
    for source in (inputs or {}).values():
        if isinstance(source, str) and source.startswith("s3://"):
            return source
    return ""


class Stager:
    """A slot's side: places inputs, collects outputs, keeps the worker's cache."""

    def __init__(self, cache: DataCache | None, scratch: str | None = None) -> None:
        self.cache = cache
        self.scratch = scratch
        self._s3: Any = None
        self.held: set[str] = set()  # S3 URLs this slot put in (or found in) the cache
        self.new_held: list[str] = []  # ... not yet reported to the broker

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.client("s3", config=Config(
                retries={"max_attempts": 8, "mode": "standard"}))
        return self._s3

    def workdir(self) -> str:
        return tempfile.mkdtemp(prefix="zfalkon-task-", dir=self.scratch)

    def stage_in(self, inputs: list[list], workdir: str) -> None:
        """Place ``inputs`` in ``workdir`` (see the module's note on links)."""
        for name, kind, _ in inputs:
            _task_name(name, "input")
            if kind not in (INLINE, S3, PATH):
                raise StagingError(f"input {name!r}: unknown kind {kind!r}")
        clash = _clash(name for name, _, _ in inputs)
        if clash:
            raise StagingError(clash)
        root = os.open(workdir, _DIR_FLAGS)
        try:
            for name, kind, value in inputs:
                if kind == PATH and not os.path.exists(value):
                    raise StagingError(f"input {name!r}: {value} does not exist")
                parent, base = _open_parent(root, name, "input", create=True)
                try:
                    if kind == INLINE:
                        with _new_file(parent, base, name) as f:
                            f.write(value)
                    elif kind == PATH:
                        os.symlink(os.path.abspath(value), base, dir_fd=parent)
                    else:
                        self._fetch(name, value, parent, base)
                except FileExistsError:
                    raise StagingError(_exists(name)) from None
                except OSError as exc:
                    raise StagingError(f"input {name!r}: {exc.strerror or exc}") from None
                finally:
                    os.close(parent)
        finally:
            os.close(root)

    def _fetch(self, name: str, url: str, parent: int, base: str) -> None:
        """Download ``url`` as ``base`` in the directory ``parent`` (a descriptor)."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(url)
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
            version = head.get("VersionId")
            # Pinned to the version when the bucket keeps versions; otherwise the ETag
            # names the cache entry (an overwrite between HEAD and GET can slip through).
            pin = {"VersionId": version} if version and version != "null" else {}
            if self.cache is None:
                with _new_file(parent, base, name) as f:
                    self.s3.download_fileobj(bucket, key, f, ExtraArgs=pin)
                return
            identity = f"{url}@{pin.get('VersionId') or head['ETag']}"
            for attempt in range(3):
                path, _ = self.cache.get(identity, lambda tmp: self.s3.download_file(
                    bucket, key, tmp, ExtraArgs=pin))
                try:
                    os.link(path, base, dst_dir_fd=parent, follow_symlinks=False)
                    break
                except FileExistsError:
                    raise
                except FileNotFoundError:  # evicted by another slot meanwhile: again
                    if attempt == 2:
                        raise StagingError(f"input {name!r}: {url} kept being evicted "
                                           "from the cache (is --cache-bytes too small?)")
                except OSError:  # the cache is on another file system
                    with open(path, "rb") as src, _new_file(parent, base, name) as dst:
                        shutil.copyfileobj(src, dst)
                    break
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            what = "does not exist" if code in ("404", "NoSuchKey", "NotFound") else str(exc)
            raise StagingError(f"input {name!r}: {url} {what}") from None
        except BotoCoreError as exc:
            raise StagingError(f"input {name!r}: {url}: {exc}") from None
        if url not in self.held:
            self.held.add(url)
            self.new_held.append(url)

    def stage_out(self, outputs: list[list], workdir: str) -> dict[str, bytes]:
        """Collect ``outputs`` from ``workdir``: regular files only, no link followed."""
        files = {}
        root = os.open(workdir, _DIR_FLAGS)
        try:
            for name, dest in outputs:
                _task_name(name, "output")
                with _open_output(root, name) as f:
                    if dest:
                        self._upload(name, f, dest)
                    else:
                        files[name] = _read_inline(name, f)
        finally:
            os.close(root)
        return files

    def _upload(self, name: str, f: IO[bytes], dest: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(dest)
        try:
            self.s3.upload_fileobj(f, bucket, key)
        except (ClientError, BotoCoreError) as exc:
            raise StagingError(f"output {name!r}: upload to {dest} failed: {exc}") from None

    def take_new_held(self, limit: int) -> list[str]:
        """Up to ``limit`` of the keys cached since the last call (the rest stay)."""
        new, self.new_held = self.new_held[:limit], self.new_held[limit:]
        return new


def _task_name(name: Any, what: str) -> str:
    try:
        return _check_name(name)
    except SerializationError as exc:
        raise StagingError(f"{what} {exc}") from None


def _exists(name: str) -> str:
    return (f"input {name!r}: something of that name is already in the task's directory "
            "(a file or a symbolic link); it is not replaced or written through")


def _open_parent(root: int, name: str, what: str, create: bool) -> tuple[int, str]:
    """A descriptor of the directory holding ``name`` under ``root``, and the file's own
    name. Each directory on the way is opened with O_NOFOLLOW (made first if ``create``),
    so a symbolic link there (an input's, or one the task made) leads nowhere."""
    *dirs, base = os.path.normpath(name).split("/")
    fd = os.dup(root)
    try:
        for i, part in enumerate(dirs):
            if create:
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                where = "/".join(dirs[:i + 1])
                if exc.errno == errno.ENOENT:
                    raise StagingError(f"{what} {name!r} was not created by the task "
                                       f"(no directory {where!r})") from None
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StagingError(
                        f"{what} {name!r}: {where!r} is a symbolic link or not a directory; "
                        "the file would be outside the task's directory") from None
                raise StagingError(f"{what} {name!r}: {where}: {exc.strerror}") from None
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd, base


def _new_file(parent: int, base: str, name: str) -> IO[bytes]:
    """A new file ``base`` in the directory ``parent``, open for writing: never one that
    exists, and never through a symbolic link."""
    try:
        fd = os.open(base, _NEW_FILE_FLAGS, 0o666, dir_fd=parent)
    except FileExistsError:
        raise StagingError(_exists(name)) from None
    return os.fdopen(fd, "wb")


def _open_output(root: int, name: str) -> IO[bytes]:
    """The output file ``name``, open for reading: a regular file, no link followed."""
    parent, base = _open_parent(root, name, "output", create=False)
    try:
        fd = os.open(base, _READ_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise StagingError(f"output {name!r} was not created by the task") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StagingError(f"output {name!r} is a symbolic link, not a file the task "
                               "wrote; links are not followed") from None
        raise StagingError(f"output {name!r}: {exc.strerror}") from None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StagingError(f"output {name!r} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_inline(name: str, f: IO[bytes]) -> bytes:
    data = f.read(INLINE_FILE_BYTES + 1)
    if len(data) > INLINE_FILE_BYTES:
        size = max(os.fstat(f.fileno()).st_size, len(data))
        raise StagingError(
            f"output {name!r} is {size} bytes, over the {INLINE_FILE_BYTES} byte "
            f"inline limit; stage it to S3 (outputs={{{name!r}: 's3://...'}})")
    return data
