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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

from zfalkon.cache import DataCache
from zfalkon.constants import INLINE_FILE_BYTES
from zfalkon.errors import SerializationError

INLINE, S3, PATH = 0, 1, 2  #: input kinds, as encoded in the task


class StagingError(Exception):
    """An input could not be placed or an output collected (the task fails with it)."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or os.path.isabs(name) or \
            ".." in name.split("/") or "\0" in name:
        raise SerializationError(f"file name {name!r} must be a relative path inside the "
                                 "task's directory (no '..')")
    return name


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket or not key:
        raise SerializationError(f"{url!r} is not s3://bucket/key")
    return bucket, key


def encode_inputs(inputs: Mapping[str, bytes | str]) -> list[list]:
    """``[[name, kind, value], ...]`` for a task blob; raises SerializationError."""
    out = []
    for name, source in inputs.items():
        _check_name(name)
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

    @staticmethod
    def _inside(workdir: str, name: str) -> str:
        """The path of ``name`` in ``workdir``; StagingError if it would lead outside (a
        hand-made task, or a name under an input that is a symlink to a shared path)."""
        try:
            _check_name(name)
        except SerializationError as exc:
            raise StagingError(str(exc)) from None
        path = os.path.join(workdir, name)
        parent = os.path.realpath(os.path.dirname(path))
        if os.path.commonpath([parent, os.path.realpath(workdir)]) != os.path.realpath(workdir):
            raise StagingError(f"file {name!r} would be outside the task's directory")
        return path

    def stage_in(self, inputs: list[list], workdir: str) -> None:
        for name, kind, value in inputs:
            dest = self._inside(workdir, name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            dest = self._inside(workdir, name)  # again, now that its directories exist
            if kind == INLINE:
                with open(dest, "wb") as f:
                    f.write(value)
            elif kind == PATH:
                if not os.path.exists(value):
                    raise StagingError(f"input {name!r}: {value} does not exist")
                os.symlink(os.path.abspath(value), dest)
            elif kind == S3:
                self._fetch(name, value, dest)
            else:
                raise StagingError(f"input {name!r}: unknown kind {kind!r}")

    def _fetch(self, name: str, url: str, dest: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(url)
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
            version = head.get("VersionId")
            # Pinned to the version when the bucket keeps versions; otherwise the ETag
            # names the cache entry (an overwrite between HEAD and GET can slip through).
            pin = {"VersionId": version} if version and version != "null" else {}
            if self.cache is None:
                self.s3.download_file(bucket, key, dest, ExtraArgs=pin)
                return
            identity = f"{url}@{pin.get('VersionId') or head['ETag']}"
            for attempt in range(3):
                path, _ = self.cache.get(identity, lambda tmp: self.s3.download_file(
                    bucket, key, tmp, ExtraArgs=pin))
                try:
                    os.link(path, dest)
                    break
                except FileNotFoundError:  # evicted by another slot meanwhile: again
                    if attempt == 2:
                        raise StagingError(f"input {name!r}: {url} kept being evicted "
                                           "from the cache (is --cache-bytes too small?)")
                except OSError:
                    shutil.copyfile(path, dest)  # the cache is on another file system
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
        from botocore.exceptions import BotoCoreError, ClientError

        files = {}
        for name, dest in outputs:
            path = self._inside(workdir, name)
            if os.path.islink(path) or not os.path.isfile(path):
                raise StagingError(f"output {name!r} was not created by the task (or is "
                                   "a symbolic link)")
            if not dest:
                size = os.path.getsize(path)
                if size > INLINE_FILE_BYTES:
                    raise StagingError(
                        f"output {name!r} is {size} bytes, over the {INLINE_FILE_BYTES} byte "
                        f"inline limit; stage it to S3 (outputs={{{name!r}: 's3://...'}})")
                with open(path, "rb") as f:
                    files[name] = f.read()
                continue
            bucket, key = split_s3(dest)
            try:
                self.s3.upload_file(path, bucket, key)
            except (ClientError, BotoCoreError) as exc:
                raise StagingError(f"output {name!r}: upload to {dest} failed: {exc}") from None
        return files

    def take_new_held(self) -> list[str]:
        new, self.new_held = self.new_held, []
        return new
