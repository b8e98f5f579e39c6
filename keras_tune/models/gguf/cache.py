"""On-disk cache of converted GGUF weights and tokenizers, keyed by the GGUF's content hash.

Per GGUF, under `cache_dir()/gguf/`: `<sha256[:32]>-v<FORMAT>.bin`, the float32
weights, and `<sha256[:32]>-tokenizer-v<TOKENIZER_FORMAT>.model`, the SentencePiece
model rebuilt from its vocabulary (0.5 s to rebuild from the metadata). Only
quantized GGUFs are cached (`cache_digest`).

The weights file is a small JSON header followed by raw float32 arrays (keras
layout), so a cached load reads each array once into a fresh buffer that becomes
the variable's device buffer. Reads, not a memory map: a map's touched pages
count as resident until it is closed, so a mapped load held the weights twice
(1 GB more peak RSS for the 270M).

Layout: `KTGGUFW1` magic (8 bytes), header length (uint64 little-endian), the
header (JSON: sha256, format, entries {name: [offset, shape]}, total size), zero
padding to 64 bytes, then the arrays at their offsets, each 64-byte aligned.

Safety: every file is written with `rundir.atomic_write`, so a crash never leaves
a half-written file under the final name. On reading, a wrong magic, an
unparsable header, a different sha256, format or set of shapes, or a file size
other than the header's total makes the loader rebuild the weights cache; a
tokenizer file SentencePiece cannot parse is rebuilt too.
"""

import hashlib
import json
import logging
import struct
from pathlib import Path

import numpy as np

from keras_tune.models.cache import cache_dir
from keras_tune.rundir import atomic_write
from keras_tune.rundir import write_text

logger = logging.getLogger(__name__)

FORMAT = 1
# Bump when `vocabulary.sentencepiece_proto` changes what it builds from the same GGUF.
TOKENIZER_FORMAT = 1
_MAGIC = b"KTGGUFW1"
_ALIGN = 64
# GGUF tensor types that convert as fast as the cache reads: files of only these are not cached.
FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_cache_dir():
    """Folder of the converted-GGUF cache: `cache_dir() / "gguf"`."""
    return cache_dir() / "gguf"


def _align(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def file_sha256(path):
    """sha256 of a file's bytes, memoized per (path, size, mtime, inode).

    The cache key has to change whenever the weights do, and only a content hash
    guarantees that (a re-quantized file can keep its name and size). Hashing
    costs about 1 s per GB, so the digest is remembered under
    `gguf_cache_dir()/digests/` and recomputed only when the file's size, mtime or
    inode changes.

    Args:
        path: the file to hash.
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
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text(memo, json.dumps({**signature, "sha256": digest.hexdigest()}))
    except OSError as error:  # a read-only cache only costs the hash next time
        logger.warning("could not write %s: %s", memo, error)
    return digest.hexdigest()


def cache_path(digest):
    """Weights cache file for the GGUF whose sha256 is `digest`.

    Args:
        digest: the GGUF's sha256 (hex).
    """
    return gguf_cache_dir() / f"{digest[:32]}-v{FORMAT}.bin"


def tokenizer_path(digest):
    """Cached SentencePiece model for the GGUF whose sha256 is `digest`.

    Args:
        digest: the GGUF's sha256 (hex).
    """
    return gguf_cache_dir() / f"{digest[:32]}-tokenizer-v{TOKENIZER_FORMAT}.model"


def read_tokenizer(digest):
    """The cached serialized SentencePiece model of a GGUF, or None if absent or unparsable.

    Args:
        digest: the GGUF's sha256 (hex).
    """
    import sentencepiece

    path = tokenizer_path(digest)
    try:
        proto = path.read_bytes()
        sentencepiece.SentencePieceProcessor(model_proto=proto)  # 0.05 s: catches a damaged file
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError) as error:
        logger.warning("unreadable tokenizer cache %s (%s): rebuilding", path, error)
        return None
    return proto


def write_tokenizer(digest, proto):
    """Caches a GGUF's serialized SentencePiece model; a failure to write only warns.

    Args:
        digest: the GGUF's sha256 (hex).
        proto: the serialized `ModelProto`.
    """
    path = tokenizer_path(digest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as partial:
            Path(partial).write_bytes(proto)
    except OSError as error:
        logger.warning("not caching the GGUF tokenizer (%s)", error)


def _layout(shapes):
    """Header dict placing float32 arrays of `shapes` (ordered name -> shape)."""
    entries, offset = {}, 0
    for name, shape in shapes.items():
        entries[name] = [offset, list(shape)]
        offset = _align(offset + 4 * int(np.prod(shape, dtype=np.int64)))
    return entries, offset


def open_cache(path, digest, shapes):
    """The cached arrays as a `CachedArrays` (`{name: float32 array}`), or None if unusable.

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
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as error:
        logger.warning("unreadable GGUF cache %s (%s): rebuilding", path, error)
        return None
    return CachedArrays(path, data_start, entries)


class CachedArrays:
    """`{name: float32 array}` over a cache file: each lookup reads that array into a new buffer.

    Args:
        path: the cache file, already checked by `open_cache`.
        data_start: byte offset of the first array.
        entries: `{name: [offset, shape]}` from the header.
    """

    def __init__(self, path, data_start, entries):
        self.path, self.data_start, self.entries = Path(path), data_start, entries

    def __contains__(self, name):
        return name in self.entries

    def __getitem__(self, name):
        offset, shape = self.entries[name]
        return self.read_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def read_rows(self, name, start_row, stop_row):
        """Rows `[start_row, stop_row)` of array `name`, as a new float32 numpy array."""
        offset, shape = self.entries[name]
        row = int(np.prod(shape[1:], dtype=np.int64))
        count = (stop_row - start_row) * row
        array = np.empty(count, np.float32)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + offset + 4 * start_row * row)
            if handle.readinto(memoryview(array).cast("B")) != 4 * count:
                raise OSError(f"{self.path}: {name} is truncated")
        return array.reshape((stop_row - start_row, *shape[1:]))

    def device_array(self, name, dtype, block_bytes=64 << 20):
        """Array `name` as a JAX array of `dtype`, never held twice in host memory.

        A small array is read and copied to the device (JAX copies a numpy buffer
        it cannot adopt; one it adopts could not be donated to a training step,
        which then copies the whole frozen model once). A large one (the 270M's
        671 MB embedding) is written into a device buffer in row blocks.

        Args:
            name: the array's name.
            dtype: the variable's dtype.
            block_bytes: largest float32 read at once.
        """
        import jax.numpy as jnp

        _, shape = self.entries[name]
        rows = shape[0] if shape else 1
        row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
        if not shape or rows * row_bytes <= block_bytes or rows < 2:
            return jnp.array(self[name], dtype=dtype)
        block = max(1, block_bytes // row_bytes)
        out = jnp.zeros(shape, dtype)
        for start in range(0, rows, block):
            start = min(start, rows - block)  # the last block overlaps: one shape, one compile
            out = _write_rows(out, jnp.asarray(self.read_rows(name, start, start + block), dtype=dtype), start)
        return out


def _write_rows(out, rows, start):
    """`out` with `rows` written at row `start`, in place (`out`'s buffer is donated)."""
    import jax

    global _write_rows_jit
    if _write_rows_jit is None:
        _write_rows_jit = jax.jit(
            lambda out, rows, start: jax.lax.dynamic_update_slice_in_dim(out, rows, start, axis=0), donate_argnums=0
        )
    return _write_rows_jit(out, rows, start)


_write_rows_jit = None


class _Abandoned(Exception):
    """Thrown into `atomic_write` to make it delete the partial file instead of renaming it."""


class CacheWriter:
    """Context manager streaming float32 arrays into a new cache file.

    The file is written under `atomic_write`'s temporary name and renamed onto
    `path` when the `with` block completes without an exception; otherwise it is
    deleted. Any OSError (read-only cache, disk full) turns the writer off with a
    warning: loading goes on, only uncached.

    Args:
        path: the cache file (`cache_path(digest)`).
        digest: sha256 of the GGUF the arrays come from.
        shapes: ordered {name: keras shape} of the arrays to be added.

    Example:

    ```python
    with CacheWriter(cache_path(digest), digest, shapes) as writer:
        for name, array in arrays.items():
            writer.add(name, array)
    ```
    """

    def __init__(self, path, digest, shapes):
        self.path = Path(path)
        self.entries, self.data_size = _layout(shapes)
        self._header = json.dumps({"sha256": digest, "format": FORMAT, "entries": self.entries}).encode()
        self.data_start = _align(16 + len(self._header))
        self._atomic = None
        self._handle = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._atomic = atomic_write(self.path)
            self._handle = open(self._atomic.__enter__(), "wb")
            self._handle.write(_MAGIC + struct.pack("<Q", len(self._header)) + self._header)
        except OSError as error:
            self._give_up(error)
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None and self._handle is not None:
            try:
                self._handle.truncate(self.data_start + self.data_size)
                self._handle.close()
                self._handle = None
                self._atomic.__exit__(None, None, None)  # renames onto `path`
                self._atomic = None
            except OSError as error:
                self._give_up(error)
        self._discard()
        return False

    def _give_up(self, error):
        logger.warning("not caching the converted GGUF (%s)", error)
        self._discard()

    def _discard(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(_Abandoned, _Abandoned(), None)  # deletes the partial file

    def add(self, name, array):
        """Writes one array at its place in the file.

        Args:
            name: a name from `shapes`.
            array: its float32 value, in that shape.
        """
        if self._handle is None:
            return
        offset, shape = self.entries[name]
        array = np.ascontiguousarray(array, dtype=np.float32)
        if list(array.shape) != shape:
            raise ValueError(f"{name}: shape {array.shape} does not match the cache layout {shape}")
        try:
            self._handle.seek(self.data_start + offset)
            self._handle.write(memoryview(array).cast("B"))
        except OSError as error:
            self._give_up(error)


def cache_digest(gguf_file):
    """The GGUF's sha256 when its conversion is worth caching (quantized weights), else None.

    F32/F16/BF16 tensors convert as fast as the cache reads, and a float32 copy of
    an F16 file would double its size on disk.
    """
    if all(info.type_name in FLOAT_TYPES for info in gguf_file.tensors.values()):
        return None
    return file_sha256(gguf_file.path)
