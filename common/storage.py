"""Run storage: a local path or an fsspec URI, read and written as whole objects.

A run's files (``config.yaml``, checkpoints, ``summary.json``) go through here, so any node
can write them and any machine can read them::

    runs/local   /abs/path   file:///abs/path   local filesystem (atomic rename available)
    memory://run                                fsspec's in-process store (tests)
    s3://bucket/prefix                          needs s3fs:  pip install 'convoy[s3]'
    gs://bucket/prefix                          needs gcsfs: pip install 'convoy[gcs]'

Credentials come from the usual places (``AWS_*`` variables, ``~/.aws``, instance roles;
``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server for gs://) and are never logged.
``CONVOY_S3_ENDPOINT_URL`` points s3:// at another S3-protocol server (MinIO, moto, Ceph);
botocore's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` work too.

Every write replaces one whole object: a single PUT on object stores, a temporary file plus
``os.replace`` locally, so a reader never sees half an object. Groups of objects (a
checkpoint) are made atomic one level up, by a manifest written last (learner.checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import fsspec

from common.config import redact_url

# The extra that brings each protocol's fsspec implementation.
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(RuntimeError):
    """A run URI cannot be used (unknown protocol, missing extra, store unreachable)."""


def redact(uri: str) -> str:
    """``uri`` without any ``user:secret@`` part, for messages and logs."""
    # No user name either (an access key id); query secrets go by the shared rule.
    return redact_url(re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri))


def protocol(uri: str | Path) -> str:
    """``"local"`` for plain paths and ``file://``, else the URI scheme (``s3``, ``memory``...)."""
    m = _SCHEME.match(str(uri))
    if m is None or m.group(1).lower() == "file":
        return "local"
    return m.group(1).lower()


def join(uri: str | Path, *parts: str) -> str:
    """``uri/part/...`` keeping the URI's form (a plain path stays a plain path)."""
    out = str(uri)
    for part in parts:
        part = part.strip("/")
        if part:
            out = out.rstrip("/") + "/" + part if out not in ("", ".") else part
    return out


def basename(uri: str | Path) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


class Store(Protocol):
    """Whole-object access below one root URI; keys are ``/``-separated relative paths."""

    @property
    def uri(self) -> str: ...

    def url(self, key: str) -> str:
        """The full URI of ``key`` (for messages, and to open it elsewhere)."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the object at ``key`` whole (parents need not exist)."""
        ...

    def write_many(self, items: dict[str, bytes]) -> None:
        """Write several objects (concurrently where the store allows); no order is promised."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, key: str = "") -> list[str]:
        """Names of the direct children of ``key`` (objects and prefixes), sorted; [] if none."""
        ...

    def remove(self, key: str) -> None:
        """Remove the object or the whole tree at ``key``; nothing there is fine."""
        ...


class LocalStore:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | Path) -> None:
        text = str(root)
        self._uri = text
        self.root = Path(text[len("file://") :] if text.lower().startswith("file://") else text)

    @property
    def uri(self) -> str:
        return self._uri

    def url(self, key: str) -> str:
        return join(self._uri, key)

    def path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_many(self, items: dict[str, bytes]) -> None:
        for key, data in items.items():
            self.write_bytes(key, data)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, key: str = "") -> list[str]:
        p = self.path(key)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def remove(self, key: str) -> None:
        p = self.path(key)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def rename(self, src: str, dst: str) -> None:
        """Atomic on one filesystem; the directory entry is synced so it survives a crash."""
        os.rename(self.path(src), self.path(dst))
        fd = os.open(self.path(dst).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Exceptions that mean "no usable credentials" (botocore, google-auth), by class name: the
# packages that define them are optional extras.
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "DefaultCredentialsError"}
)
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials, an instance role)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run `gcloud auth "
    "application-default login`)",
}


def _is_credential_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _CREDENTIAL_ERRORS:
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def _credentials_checked(uri: str) -> Iterator[None]:
    """Turn a missing-credentials error of any depth into one StorageError naming the
    (redacted) URI and what to set."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ == "ParamValidationError":  # botocore; its text may echo the URI unredacted
            raise StorageError(
                f"{redact(uri)} is not a valid {protocol(uri)}:// URI (credentials go in the environment, "
                "never in the URI)"
            ) from None
        if not _is_credential_error(exc):
            raise
        proto = protocol(uri)
        hint = _CREDENTIAL_HINTS.get({"s3a": "s3", "gcs": "gs"}.get(proto, proto), "configure its credentials")
        raise StorageError(f"no credentials for {redact(uri)}: {hint}") from None


class FsspecStore:
    """Any other fsspec filesystem: object stores (no rename) and ``memory://``."""

    def __init__(self, uri: str) -> None:
        self._uri = uri.rstrip("/")
        proto = protocol(uri)
        options: dict[str, Any] = {}
        if proto in ("s3", "s3a", "gs", "gcs"):
            # Listings must be fresh: `convoy checkpoints list` and the pruner look for
            # manifests that another process wrote a moment ago.
            options["use_listings_cache"] = False
        if proto in ("s3", "s3a") and os.environ.get("CONVOY_S3_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["CONVOY_S3_ENDPOINT_URL"]
        try:
            self.fs, self._root = fsspec.core.url_to_fs(uri, **options)
        except ImportError:
            module, extra = _EXTRAS.get(proto, (proto, proto))
            raise StorageError(
                f"{proto}:// run storage needs the {module} package: pip install 'convoy[{extra}]'"
            ) from None
        except ValueError as exc:  # fsspec: "Protocol not known"
            raise StorageError(f"cannot use {redact(uri)!r} as run storage: {exc}") from None
        self._root = self._root.rstrip("/")

    @property
    def uri(self) -> str:
        return self._uri

    def url(self, key: str) -> str:
        return join(self._uri, key)

    def _path(self, key: str) -> str:
        return f"{self._root}/{key.strip('/')}" if key.strip("/") else self._root

    def read_bytes(self, key: str) -> bytes:
        with _credentials_checked(self.url(key)):
            data = self.fs.cat_file(self._path(key))
        return bytes(data)

    def write_bytes(self, key: str, data: bytes) -> None:
        with _credentials_checked(self.url(key)):
            self.fs.pipe_file(self._path(key), data)

    def write_many(self, items: dict[str, bytes]) -> None:
        # One call: async filesystems (s3fs, gcsfs) upload the objects concurrently.
        with _credentials_checked(self._uri):
            self.fs.pipe({self._path(k): v for k, v in items.items()})

    def exists(self, key: str) -> bool:
        with _credentials_checked(self.url(key)):
            return bool(self.fs.exists(self._path(key)))

    def list(self, key: str = "") -> list[str]:
        path = self._path(key)
        try:
            with _credentials_checked(self.url(key)):
                entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        # ls of a plain object lists the object itself, which is not a child.
        children = [str(e).rstrip("/") for e in entries]
        return sorted({basename(c) for c in children if c != path})

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), _credentials_checked(self.url(key)):
            self.fs.rm(self._path(key), recursive=True)


def open_store(uri: str | Path) -> Store:
    """The store for a run URI (a plain path or ``file://`` gives the local store)."""
    if not str(uri):
        raise StorageError("empty run URI: give a local path or an fsspec URI such as s3://bucket/run")
    if protocol(uri) == "local":
        return LocalStore(uri)
    return FsspecStore(str(uri))


def _split(uri: str | Path) -> tuple[Store, str]:
    """A store at ``uri``'s parent and the object's name in it."""
    text = str(uri).rstrip("/")
    if protocol(text) == "local":
        p = Path(text[len("file://") :] if text.lower().startswith("file://") else text)
        return LocalStore(p.parent), p.name
    head, _, name = text.rpartition("/")
    if not name or head.endswith(":/"):
        raise StorageError(f"{redact(text)!r} names no object (expected e.g. s3://bucket/run/config.yaml)")
    return FsspecStore(head), name


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write one whole object at ``uri`` (e.g. ``join(run_uri, "summary.json")``)."""
    store, name = _split(uri)
    store.write_bytes(name, data)


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode())


def read_bytes(uri: str | Path) -> bytes:
    """One whole object; FileNotFoundError if there is none."""
    store, name = _split(uri)
    return store.read_bytes(name)


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode()


def exists(uri: str | Path) -> bool:
    store, name = _split(uri)
    return store.exists(name)
