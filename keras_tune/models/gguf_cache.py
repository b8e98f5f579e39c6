"""On-disk cache of converted GGUF weights, keyed by the GGUF's content hash.

One cache file per GGUF: `cache_dir()/gguf/<sha256[:32]>-v<FORMAT>.bin`. It is a
small JSON header followed by raw float32 arrays (keras layout), so a cached load
memory-maps the file and copies each array once before `variable.assign` (about
0.5 s for the 1.07 GB of Gemma 3 270M, against 2 s for an `.npz` that is read and
CRC-checked entry by entry). Only quantized GGUFs are cached (see
`gguf._assign_weights`).

Layout: `KTGGUFW1` magic (8 bytes), header length (uint64 little-endian), the
header (JSON: sha256, format, entries {name: [offset, shape]}, total size), zero
padding to 64 bytes, then the arrays at their offsets, each 64-byte aligned.

Safety: the file is written under a temporary name and renamed into place, so a
crash never leaves a half-written file under the final name. On reading, a wrong
magic, an unparsable header, a different sha256, format or set of shapes, or a
file size other than the header's total makes the loader rebuild the cache.
"""

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from keras_tune.models.tiny import cache_dir

logger = logging.getLogger(__name__)

FORMAT = 1
_MAGIC = b"KTGGUFW1"
_ALIGN = 64


def gguf_cache_dir():
    """Folder of the converted-GGUF cache: `cache_dir() / "gguf"`."""
    return cache_dir() / "gguf"


def _align(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _atomic_write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.tmp{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def file_sha256(path):
    """sha256 of a file's bytes, memoized per (path, size, mtime, inode).

    The cache key has to change whenever the weights do, and only a content hash
    guarantees that (a re-quantized file can keep its name and size). Hashing
    costs about 1 s per GB, so the digest is remembered under
    `gguf_cache_dir()/digests/` and recomputed only when the file's size, mtime or
    inode changes.
    """
    path = Path(path).resolve()
    stat = path.stat()
    signature = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    memo = gguf_cache_dir() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if {key: saved.get(key) for key in signature} == signature and len(saved.get("sha256", "")) == 64:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    try:
        _atomic_write_text(memo, json.dumps({**signature, "sha256": digest.hexdigest()}))
    except OSError as error:  # a read-only cache only costs the hash next time
        logger.warning("could not write %s: %s", memo, error)
    return digest.hexdigest()


def cache_path(digest):
    """Cache file for the GGUF whose sha256 is `digest`."""
    return gguf_cache_dir() / f"{digest[:32]}-v{FORMAT}.bin"


def _layout(shapes):
    """Header dict placing float32 arrays of `shapes` (ordered name -> shape)."""
    entries, offset = {}, 0
    for name, shape in shapes.items():
        entries[name] = [offset, list(shape)]
        offset = _align(offset + 4 * int(np.prod(shape, dtype=np.int64)))
    return entries, offset


def open_cache(path, digest, shapes):
    """The cached arrays as {name: read-only float32 view}, or None if unusable.

    Args:
        path: the cache file.
        digest: sha256 of the GGUF it must come from.
        shapes: ordered {name: keras shape} the model needs.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            if len(head) < 16 or head[:8] != _MAGIC:
                raise ValueError("bad magic")
            (header_length,) = struct.unpack("<Q", head[8:])
            if header_length > 64 << 20:
                raise ValueError("header too long")
            header = json.loads(handle.read(header_length).decode())
        entries, data_size = _layout(shapes)
        data_start = _align(16 + header_length)
        if (
            header.get("sha256") != digest
            or header.get("format") != FORMAT
            or header.get("entries") != entries
            or path.stat().st_size != data_start + data_size
        ):
            logger.warning("stale or incomplete GGUF cache %s: rebuilding", path)
            return None
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as error:
        logger.warning("unreadable GGUF cache %s (%s): rebuilding", path, error)
        return None
    arrays = {}
    for name, (offset, shape) in entries.items():
        start = data_start + offset
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = mapped[start : start + 4 * count].view(np.float32).reshape(shape)
    return arrays


class CacheWriter:
    """Streams float32 arrays into `<path>.tmp<pid>`; `commit()` renames it into place.

    Any OSError (read-only cache, disk full) turns the writer off with a warning:
    loading goes on, only uncached.
    """

    def __init__(self, path, digest, shapes):
        self.path = Path(path)
        self.partial = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        self.entries, self.data_size = _layout(shapes)
        self.handle = None
        header = json.dumps({"sha256": digest, "format": FORMAT, "entries": self.entries}).encode()
        self.data_start = _align(16 + len(header))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.partial, "wb")
            self.handle.write(_MAGIC + struct.pack("<Q", len(header)) + header)
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error):
        logger.warning("not caching the converted GGUF (%s)", error)
        self.abort()

    def add(self, name, array):
        if self.handle is None:
            return
        offset, shape = self.entries[name]
        array = np.ascontiguousarray(array, dtype=np.float32)
        if list(array.shape) != shape:
            raise ValueError(f"{name}: shape {array.shape} does not match the cache layout {shape}")
        try:
            self.handle.seek(self.data_start + offset)
            self.handle.write(memoryview(array).cast("B"))
        except OSError as error:
            self._give_up(error)

    def commit(self):
        if self.handle is None:
            return
        try:
            self.handle.truncate(self.data_start + self.data_size)
            self.handle.close()
            self.handle = None
            os.replace(self.partial, self.path)
        except OSError as error:
            self._give_up(error)

    def abort(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.partial.unlink(missing_ok=True)
