"""Where a store lives: a local directory or any fsspec URL (memory://, s3://, ...).

Local stores get real atomic commits (rename of a finished directory); object stores, which
have no rename, get the commit record written last, so a shard without one is invisible.

Credentials and endpoints of object stores come only from where their clients already look:
for S3, the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION`)
and `~/.aws/config`; for any protocol, fsspec's own config (`FSSPEC_S3_ENDPOINT_URL=...`,
`FSSPEC_S3='{"client_kwargs": {...}}'`, or `~/.config/fsspec/*.json`). Store URLs travel
through configs, Prefect parameters, logs and error messages, so a URL carrying credentials
(`s3://key:secret@bucket/...`) is refused instead of being written anywhere.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kdstore.errors import StoreError

# Object stores whose fsspec clients cache directory listings: another process (a parallel
# writer, a pass that is resuming) changes the store behind this one's back, so never reuse them.
_LISTING_CACHED = ("s3", "s3a", "gs", "gcs", "abfs", "az")
_CREDENTIALS_IN_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@")


@dataclass(frozen=True)
class Location:
    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @classmethod
    def of(cls, url: str | os.PathLike[str]) -> Location:
        text = os.fspath(url)
        if _CREDENTIALS_IN_URL.match(text):
            raise StoreError(f"store URL {redact(text)!r} carries credentials: put them in the standard "
                             "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the client's config")
        protocol = text.split("://", 1)[0] if "://" in text else "file"
        options = {"use_listings_cache": False} if protocol in _LISTING_CACHED else {}
        fs, root = fsspec.core.url_to_fs(text, **options)
        if isinstance(fs, LocalFileSystem) and os.path.isfile(root):
            raise StoreError(f"store {text!r} is a file, not a folder: name a new folder or an existing store")
        return cls(fs=fs, root=root.rstrip("/") or "/", url=text)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def local_path(self, *parts: str) -> Path:
        assert self.is_local
        return Path(self.path(*parts))

    # Local paths go straight to the OS: fsspec's per-call overhead is most of the cost of the
    # check before training, which reads one small commit record per shard.
    def exists(self, *parts: str) -> bool:
        return os.path.exists(self.path(*parts)) if self.is_local else self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        if self.is_local:
            with open(self.path(*parts), "rb") as fh:
                return fh.read()
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a small file so readers never see it half-written (temp + rename where possible)."""
        target = self.path(*parts)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.is_local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def free_bytes(self) -> int | None:
        """Free bytes on the disk that holds (or will hold) a local store; None for object stores."""
        if not self.is_local:
            return None
        path = Path(self.root)
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the sub-directories (empty list when the directory does not exist)."""
        base = self.path(*parts)
        if self.is_local:
            return sorted(e.name for e in os.scandir(base) if e.is_dir()) if os.path.isdir(base) else []
        if not self.fs.exists(base):
            return []
        names = []
        for info in self.fs.ls(base, detail=True):
            if info["type"] == "directory":
                names.append(posixpath.basename(info["name"].rstrip("/")))
        return sorted(names)

    def walk_files(self, *parts: str) -> dict[str, int]:
        """Relative path → size of every file below a directory."""
        base = self.path(*parts)
        out = {}
        if self.is_local:  # os.walk: fsspec's find costs more than the hashing on many small shards
            for folder, _, names in os.walk(base):
                prefix = folder[len(base) + 1:]
                for name in names:
                    out[f"{prefix}/{name}" if prefix else name] = os.stat(os.path.join(folder, name)).st_size
            return out
        for name, info in self.fs.find(base, detail=True).items():
            rel = posixpath.relpath(self.fs._strip_protocol(name), self.fs._strip_protocol(base))
            out[rel] = int(info["size"])
        return out


def redact(url: str) -> str:
    """`url` with any user:password part replaced, for messages."""
    return _CREDENTIALS_IN_URL.sub(lambda m: m.group(0).split("://", 1)[0] + "://***@", url)
