"""Reading a GGUF file: header, metadata, tensor index and dequantized tensors.

`gguf.GGUFReader` (llama.cpp's reader) builds one numpy view per string in the
header, which costs about 13 s on Gemma's 262144-token vocabulary. This module
parses the header itself with `struct` over a memory map (about 0.2 s) and keeps
only the part of `gguf` that needs no rewriting: the quantization table and the
numpy dequantizers (`gguf.quants.dequantize`).

Every check that can fail on a damaged or foreign file happens in `read_gguf`,
before any weight is touched: a truncated header, an unknown tensor type or a
tensor whose bytes run past the end of the file raises `UserError`, so a model
is never half-loaded.

Example:

```python
from keras_tune.models.gguf.file import read_gguf
gguf_file = read_gguf("gemma-3-270m-q4_k_m.gguf")
print(gguf_file.metadata["general.architecture"], len(gguf_file.tensors))
embedding = gguf_file.tensor("token_embd.weight")  # float32, shape (vocab, hidden)
```
"""

import dataclasses
import mmap
import struct
from pathlib import Path

import numpy as np

from keras_tune.errors import UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf spec): id -> struct format of one scalar.
_SCALAR_FORMATS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING = 8
_ARRAY = 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor index.

    Attributes:
        name: GGUF tensor name, e.g. `"blk.0.attn_q.weight"`.
        shape: numpy (row-major) shape: the GGUF dims reversed, so a linear
            layer reads `(out_features, in_features)` as in PyTorch.
        type_name: ggml type, e.g. `"Q4_K"`, `"F32"`.
        type_id: the numeric ggml type.
        offset: absolute byte offset of the data in the file.
        n_bytes: size of the data in bytes.
    """

    name: str
    shape: tuple
    type_name: str
    type_id: int
    offset: int
    n_bytes: int


class GGUFFile:
    """A parsed GGUF file: `metadata` (dict), `tensors` (name -> TensorInfo).

    Holds a read-only memory map of the file; `tensor(name)` dequantizes one
    tensor to float32 on demand. Use as a context manager or call `close()`.
    """

    def __init__(self, path, metadata, tensors, buffer, file_size):
        self.path = Path(path)
        self.metadata = metadata
        self.tensors = tensors
        self.file_size = file_size
        self._buffer = buffer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._buffer is not None:
            try:
                self._buffer.close()
            except BufferError:  # a caller still holds a `raw()` view: the map closes with it
                pass
            self._buffer = None

    @property
    def architecture(self):
        return self.metadata.get("general.architecture")

    def raw(self, name):
        """The undecoded bytes of tensor `name` as a uint8 numpy view (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._buffer, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def tensor(self, name):
        """Tensor `name` dequantized to a float32 array of shape `info.shape`."""
        import gguf

        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.type_id)
        data = self.raw(name)
        if qtype != gguf.GGMLQuantizationType.F32 and qtype != gguf.GGMLQuantizationType.F16:
            data = data.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, qtype))
        try:
            values = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise UserError(
                f"{self.path}: tensor {name} has type {info.type_name}, which the installed "
                f"`gguf` package cannot dequantize; expected one of {', '.join(dequantizable_types())}"
            ) from None
        # A copy: F32 "dequantizes" to a view of the memory map, which must not outlive it.
        return np.array(values, dtype=np.float32).reshape(info.shape)


def dequantizable_types():
    """Names of the ggml tensor types `gguf.quants.dequantize` can decode."""
    import gguf

    from keras_tune import compat

    names = ["F32", "F16"]
    for qtype in gguf.GGMLQuantizationType:
        if compat.gguf_dequantizable(qtype):
            names.append(qtype.name)
    return names


class _Cursor:
    """Sequential little-endian reads over a buffer; running off the end means truncation."""

    def __init__(self, buffer, path):
        self.buffer = buffer
        self.offset = 0
        self.path = path

    def _truncated(self):
        return UserError(
            f"{self.path} is truncated or not a GGUF file: its header ends early "
            f"(at byte {self.offset} of {len(self.buffer)})"
        )

    def unpack(self, fmt):
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        except struct.error:
            raise self._truncated() from None
        self.offset += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self):
        length = self.unpack("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise self._truncated()
        raw = self.buffer[self.offset : end]
        self.offset = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, value_type):
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            fmt = self._format(item_type)
            size = struct.calcsize(fmt) * count
            if self.offset + size > len(self.buffer):
                raise self._truncated()
            dtype = np.dtype(np.bool_) if fmt == "?" else np.dtype("<" + fmt)
            array = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset).copy()
            self.offset += size
            return array
        return self.unpack(self._format(value_type))

    def _format(self, value_type):
        if value_type not in _SCALAR_FORMATS:
            raise UserError(f"{self.path}: unknown GGUF metadata value type {value_type} at byte {self.offset}")
        return _SCALAR_FORMATS[value_type]


def read_gguf(path):
    """Parses the header of the GGUF file at `path` and checks it is complete.

    Args:
        path: path of a `.gguf` file.

    Returns:
        A `GGUFFile`; close it when done (or use `with`).

    Raises:
        UserError: the file is missing, not GGUF, of an unsupported version,
            truncated, or holds a tensor of an unknown ggml type.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    file_size = path.stat().st_size
    if file_size < 24:
        raise UserError(f"{path} is truncated or not a GGUF file: {file_size} bytes")
    with open(path, "rb") as handle:
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        metadata, tensors = _parse(buffer, path, file_size, gguf)
    except BaseException:
        buffer.close()
        raise
    return GGUFFile(path, metadata, tensors, buffer, file_size)


def _parse(buffer, path, file_size, gguf):
    if buffer[:4] != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file: it starts with {bytes(buffer[:4])!r}, expected b'GGUF'")
    cursor = _Cursor(buffer, path)
    cursor.offset = 4
    version = cursor.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS else ""
        raise UserError(f"{path}: GGUF version {version}{hint} is not supported; expected one of {SUPPORTED_VERSIONS}")
    tensor_count, kv_count = cursor.unpack("QQ")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("I"))

    raw_infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("I")
        dims = [cursor.unpack("Q") for _ in range(n_dims)]
        type_id = cursor.unpack("I")
        offset = cursor.unpack("Q")
        raw_infos.append((name, dims, type_id, offset))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cursor.offset + alignment - 1) // alignment * alignment
    tensors = {}
    for name, dims, type_id, offset in raw_infos:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise UserError(f"{path}: tensor {name} has unknown ggml type id {type_id}") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if n_elements % block_size:
            raise UserError(
                f"{path}: tensor {name} has {n_elements} elements, not a multiple of the "
                f"{qtype.name} block size {block_size}"
            )
        n_bytes = n_elements // block_size * type_size
        start = data_start + offset
        if start + n_bytes > file_size:
            raise UserError(
                f"{path} is truncated: tensor {name} needs bytes {start}..{start + n_bytes} "
                f"but the file has {file_size} bytes"
            )
        tensors[name] = TensorInfo(
            name=name,
            shape=tuple(int(d) for d in reversed(dims)),
            type_name=qtype.name,
            type_id=type_id,
            offset=start,
            n_bytes=n_bytes,
        )
    return metadata, tensors
