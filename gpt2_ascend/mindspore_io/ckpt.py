"""MindSpore `.ckpt` files without MindSpore.

The format (mindspore/train/serialization.py and checkpoint.proto, MindSpore 2.x, proto2):

    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

A file is a run of serialized one-value `Checkpoint` messages (which protobuf reads as one message with many
values). tensor_content is the raw little-endian C-order data. MindSpore cuts a tensor into records of at
most 512 MiB (`1024 * SLICE_SIZE` bytes), each with the same tag and the full dims; a reader joins
consecutive records with the same tag. Numeric scalars have no dims; strings (type "str", UTF-32) have
dims [0], which MindSpore's loader also reads as a scalar. With `crc_check=True` MindSpore appends a
17-byte trailer: b"crc_num" + the CRC-32 (zlib's) of every byte before it, as a 10-byte big-endian int.

Writing encodes each record's protobuf fields directly (checkpoint.proto beside this module; the content written
from the tensor's memory, no copy), in protobuf's own order, so the bytes are the ones MindSpore writes (tested
against its files and against protobuf's serializer). Reading walks the protobuf wire format directly to
index every record's tag, dims, type and data offset without loading data: a 52B checkpoint then costs
one tensor of memory at a time, not the whole file (MindSpore itself parses the whole file at once).
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field

import torch

from ..fileio import AtomicFile
from ..fileio import tensor_bytes as state_bytes
from .proto import proto_messages

# MindSpore's largest record: serialization.py writes `1024 * SLICE_SIZE` bytes per record (SLICE_SIZE
# = 512 * 1024), under protobuf's 2 GiB message limit.
CHUNK_BYTES = 512 * 1024 * 1024
CRC_MAGIC = b"crc_num"
CRC_TRAILER_BYTES = len(CRC_MAGIC) + 10

TORCH_DTYPES = {
    "Float32": torch.float32, "Float16": torch.float16, "BFloat16": torch.bfloat16, "Float64": torch.float64,
    "Int8": torch.int8, "Int16": torch.int16, "Int32": torch.int32, "Int64": torch.int64,
    "UInt8": torch.uint8, "UInt16": torch.uint16, "UInt32": torch.uint32, "UInt64": torch.uint64,
    "Bool": torch.bool,
}
MS_TYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class CkptError(ValueError):
    """A .ckpt file that cannot be read: truncated, corrupt, or not a MindSpore checkpoint."""


# ---------------------------------------------------------------------------------------------
# the schema (checkpoint.proto beside this module)
# ---------------------------------------------------------------------------------------------
def checkpoint_messages():
    """(Checkpoint, TensorProto) message classes of MindSpore's checkpoint.proto (built at run time: proto.py)."""
    messages = proto_messages("checkpoint.proto")
    return messages["Checkpoint"], messages["TensorProto"]


def varint(n: int) -> bytes:
    """protobuf's base-128 varint; a negative int64 as its 10-byte two's complement."""
    n = n + (1 << 64) if n < 0 else n
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(number: int, size: int) -> bytes:
    """The key and length of a length-delimited field of `size` bytes (wire type 2)."""
    return varint(number << 3 | 2) + varint(size)


def record_header(name: str, dims, type_name: str, content_bytes: int) -> bytes:
    """Every byte of one serialized Checkpoint{value: [Value{tag, tensor: TensorProto{dims, tensor_type,
    tensor_content}}]} record before its tensor_content, as protobuf orders them (by field number, proto2's unpacked
    dims), so that the content itself is written from the tensor's memory without a copy."""
    tag, type_bytes = name.encode("utf-8"), type_name.encode("utf-8")
    tensor_head = (b"".join(varint(1 << 3) + varint(d) for d in dims) + length_delimited(2, len(type_bytes))
                   + type_bytes + length_delimited(3, content_bytes))
    tensor_size = len(tensor_head) + content_bytes
    value_head = length_delimited(1, len(tag)) + tag + length_delimited(2, tensor_size)
    return length_delimited(1, len(value_head) + tensor_size) + value_head + tensor_head


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def tensor_bytes(tensor: torch.Tensor):
    """The raw bytes of a tensor, C order, as a flat uint8 numpy view (no copy when contiguous on CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


class CkptWriter:
    """Write a .ckpt record by record; the file appears (atomically) on close().

    >>> with CkptWriter("model.ckpt") as w:
    ...     w.write("backbone.layernorm.gamma", torch.ones(768))
    """

    def __init__(self, path: str, crc: bool = True, chunk_bytes: int = CHUNK_BYTES, size: int | None = None):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory: pass a .ckpt file name")
        self.path = os.path.abspath(path)
        self.size = size  # the tensor bytes the file will hold, for a full disk's message
        self.crc = crc
        self.chunk_bytes = chunk_bytes
        self.crc_value = 0
        self.names: set[str] = set()
        self.out = AtomicFile(self.path, size, what=self.path)
        self.file = self.out.file

    def write(self, name: str, value):
        """A tensor (any dtype in TORCH_DTYPES) or a string, as MindSpore's save_checkpoint writes it."""
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice to {self.path}")
        self.names.add(name)
        if isinstance(value, str):
            # numpy's "U" layout: UTF-32-LE, dims [0]
            self._write_record(name, [0], "str", value.encode("utf-32-le"))
            return
        if value.dtype not in MS_TYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {value.dtype}, which a MindSpore checkpoint cannot hold")
        data = tensor_bytes(value)
        dims, type_name = list(value.shape), MS_TYPE_NAMES[value.dtype]
        step = max(value.element_size(), self.chunk_bytes // value.element_size() * value.element_size())
        for start in range(0, max(len(data), 1), step):  # one record even for an empty tensor
            self._write_record(name, dims, type_name, data[start:start + step])

    def _write_record(self, name, dims, type_name, content):
        header = record_header(name, dims, type_name, len(content))
        for part in (header, memoryview(content)):  # the tensor's bytes go from its memory to the file
            if self.crc:
                self.crc_value = zlib.crc32(part, self.crc_value)
            self.file.write(part)

    def close(self):
        """Write the crc trailer and move the file into place (fileio.AtomicFile: fsync'd, the umask's mode like
        every output). On failure the temporary is removed."""
        if self.file.closed:
            return
        try:
            if self.crc:
                self.file.write(CRC_MAGIC + self.crc_value.to_bytes(10, "big"))
        except BaseException as e:
            self.abort(e)
            raise
        self.out.commit()

    def abort(self, error: BaseException | None = None):
        """Remove the temporary; a full disk becomes DiskFullError (one line, with the bytes needed)."""
        self.out.abort(error)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)
        return False


def write_ckpt(path: str, tensors, crc: bool = True, chunk_bytes: int = CHUNK_BYTES):
    """Write a dict (or iterable of (name, tensor-or-str) pairs) as a MindSpore .ckpt."""
    items = tensors.items() if hasattr(tensors, "items") else tensors
    size = state_bytes(dict(tensors)) if hasattr(tensors, "items") else None
    with CkptWriter(path, crc=crc, chunk_bytes=chunk_bytes, size=size) as writer:
        for name, value in items:
            writer.write(name, value)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@dataclass
class CkptEntry:
    """One named value of a checkpoint: where its records' data lie in the file, and what they hold."""
    name: str
    dims: tuple
    tensor_type: str
    chunks: list = field(default_factory=list)  # (file offset, byte length) of each record's tensor_content
    is_map: bool = False  # a MapParameter (embedding hash table), not a plain tensor

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.chunks)

    @property
    def dtype(self) -> torch.dtype | None:
        return TORCH_DTYPES.get(self.tensor_type)

    @property
    def shape(self) -> tuple:
        # MindSpore reads dims [0] as a scalar; [] is how it writes numeric scalars
        if self.dims == (0,) and self.dtype is not None and self.nbytes == self.dtype.itemsize:
            return ()
        return self.dims


class _Walker:
    """Reads protobuf wire-format fields from a file range, with clear errors on truncation."""

    def __init__(self, file, path, end):
        self.file, self.path, self.end = file, path, end

    def fail(self, what, offset):
        raise CkptError(f"{self.path} is truncated or corrupt ({what} at byte {offset}); re-copy or re-save the "
                        f"checkpoint (is it a MindSpore .ckpt, unencrypted?)")

    def varint(self, limit):
        start = self.file.tell()
        result = shift = 0
        while True:
            if self.file.tell() >= limit:
                self.fail("a number runs past the end of its record", start)
            byte = self.file.read(1)
            if not byte:
                self.fail("unexpected end of file", start)
            result |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return result
            shift += 7
            if shift >= 70:
                self.fail("malformed varint", start)

    def key(self, limit):
        key = self.varint(limit)
        return key >> 3, key & 7

    def length(self, limit):
        """A length-delimited field's size; returns (start, end) of its bytes inside `limit`."""
        n = self.varint(limit)
        start = self.file.tell()
        if start + n > limit:
            where = "the end of the file" if limit == self.end else "its record"
            self.fail(f"a field of {n} bytes runs past {where}", start)
        return start, start + n

    def read(self, limit):
        start, end = self.length(limit)
        return self.file.read(end - start)

    def skip(self, wire_type, limit):
        offset = self.file.tell()
        if wire_type == 0:
            self.varint(limit)
        elif wire_type == 1:
            self.file.seek(offset + 8)
        elif wire_type == 2:
            self.file.seek(self.length(limit)[1])
        elif wire_type == 5:
            self.file.seek(offset + 4)
        else:
            self.fail(f"unknown wire type {wire_type}", offset)
        if self.file.tell() > limit:
            self.fail("a field overruns its record", offset)


def _parse_tensor(walker: _Walker, end: int):
    dims, tensor_type, content = [], None, None
    while walker.file.tell() < end:
        number, wire_type = walker.key(end)
        if number == 1 and wire_type == 0:
            dims.append(walker.varint(end))
        elif number == 1 and wire_type == 2:  # packed dims
            _, packed_end = walker.length(end)
            while walker.file.tell() < packed_end:
                dims.append(walker.varint(packed_end))
        elif number == 2 and wire_type == 2:
            tensor_type = walker.read(end).decode("utf-8", errors="replace")
        elif number == 3 and wire_type == 2:
            start, content_end = walker.length(end)
            content = (start, content_end - start)
            walker.file.seek(content_end)
        else:
            walker.skip(wire_type, end)
    dims = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)  # int64 two's complement
    return dims, tensor_type, content


class CkptReader:
    """Index of a .ckpt file; tensors are read one at a time with `load(name)`.

    >>> with CkptReader("gpt2.ckpt") as ckpt:
    ...     for name, entry in ckpt.entries.items(): print(name, entry.shape, entry.tensor_type)
    ...     wte = ckpt.load("backbone.embedding.word_embedding.embedding_table")
    """

    def __init__(self, path: str, verify_crc: bool = True):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        self.path = path
        self.file = open(path, "rb")
        try:
            self.size = os.fstat(self.file.fileno()).st_size
            if self.size == 0:
                raise CkptError(f"{path} is empty: not a MindSpore checkpoint")
            self.crc_stored = self._read_trailer()
            self.data_end = self.size - (CRC_TRAILER_BYTES if self.crc_stored is not None else 0)
            self.entries: dict[str, CkptEntry] = {}
            self._index()
            if verify_crc and self.crc_stored is not None:
                self._verify_crc()
        except BaseException:
            self.file.close()
            raise

    @property
    def has_crc(self) -> bool:
        return self.crc_stored is not None

    def _read_trailer(self):
        if self.size < CRC_TRAILER_BYTES:
            return None
        self.file.seek(self.size - CRC_TRAILER_BYTES)
        tail = self.file.read(CRC_TRAILER_BYTES)
        if tail[: len(CRC_MAGIC)] != CRC_MAGIC:
            return None
        return int.from_bytes(tail[len(CRC_MAGIC):], "big")

    def _index(self):
        walker = _Walker(self.file, self.path, self.data_end)
        self.file.seek(0)
        previous = None
        while self.file.tell() < self.data_end:
            offset = self.file.tell()
            number, wire_type = walker.key(self.data_end)
            if (number, wire_type) != (1, 2):
                raise CkptError(f"{self.path} is not a MindSpore checkpoint (unexpected protobuf field {number} "
                                f"at byte {offset}); pass a .ckpt written by mindspore.save_checkpoint")
            _, end = walker.length(self.data_end)
            tag, tensor, is_map = None, None, False
            while self.file.tell() < end:
                field_number, field_type = walker.key(end)
                if field_number == 1 and field_type == 2:
                    tag = walker.read(end).decode("utf-8", errors="replace")
                elif field_number == 2 and field_type == 2:
                    _, tensor_end = walker.length(end)
                    tensor = _parse_tensor(walker, tensor_end)
                elif field_number == 3 and field_type == 2:
                    is_map = True
                    walker.skip(field_type, end)
                else:
                    walker.skip(field_type, end)
            self._add_record(tag, tensor, is_map, offset, previous)
            previous = tag
        for entry in self.entries.values():
            self._check_size(entry)

    def _check_size(self, entry: CkptEntry):
        """Dims that agree with the bytes stored, so a crafted file cannot make a reader allocate more than it holds."""
        if entry.is_map or entry.dtype is None:
            return
        shape = entry.shape
        if any(d < 0 for d in shape) or math.prod(shape) * entry.dtype.itemsize != entry.nbytes:
            raise CkptError(f"{self.path} is corrupt: {entry.name!r} has {entry.nbytes} bytes of data but dims "
                            f"{list(entry.dims)} of {entry.tensor_type} need "
                            f"{max(0, math.prod(shape)) * entry.dtype.itemsize}")

    def _add_record(self, tag, tensor, is_map, offset, previous):
        if tag is None:
            raise CkptError(f"{self.path} is corrupt: the record at byte {offset} has no name")
        if is_map:
            self.entries.setdefault(tag, CkptEntry(tag, (), "map", is_map=True))
            return
        if tensor is None or tensor[1] is None or tensor[2] is None:
            raise CkptError(f"{self.path} is corrupt: record {tag!r} at byte {offset} has no tensor type or data")
        dims, tensor_type, content = tensor
        entry = self.entries.get(tag)
        if entry is None:
            self.entries[tag] = CkptEntry(tag, dims, tensor_type, [content])
        elif previous == tag and entry.dims == dims and entry.tensor_type == tensor_type:
            entry.chunks.append(content)  # the next slice of a big tensor
        else:
            raise CkptError(f"{self.path} is corrupt: {tag!r} appears twice (records are not consecutive or "
                            f"disagree on shape/type)")

    def _verify_crc(self):
        self.file.seek(0)
        crc, remaining = 0, self.data_end
        while remaining:
            block = self.file.read(min(remaining, 1 << 20))  # small blocks: a file is never in memory
            if not block:
                raise CkptError(f"{self.path} is truncated (crc check)")
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
        if crc != self.crc_stored:
            raise CkptError(f"{self.path} fails its crc check (stored {self.crc_stored:#010x}, computed {crc:#010x}): "
                            f"the file is damaged; re-copy or re-save it")

    def read_bytes(self, entry: CkptEntry) -> torch.Tensor:
        """The concatenated tensor_content of an entry's records, as a uint8 tensor."""
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        position = 0
        for offset, length in entry.chunks:
            self.file.seek(offset)
            if self.file.readinto(view[position:position + length]) != length:
                raise CkptError(f"{self.path} is truncated inside tensor {entry.name!r}")
            position += length
        return buffer

    def load(self, name: str):
        """A tensor (numeric types), a str ("str" entries) or raw bytes (anything else)."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not in {self.path}")
        if entry.is_map:
            raise CkptError(f"{name!r} in {self.path} is a MapParameter (hash-table embedding), not a tensor")
        data = self.read_bytes(entry)
        if entry.tensor_type == "str":
            return bytes(data.numpy()).decode("utf-32-le", errors="replace").rstrip("\x00")
        if entry.dtype is None:
            return bytes(data.numpy())
        if entry.dtype == torch.bool:  # sizes checked when the file was indexed
            return data.view(torch.bool).reshape(entry.shape)
        return data.view(entry.dtype).reshape(entry.shape)

    def items(self):
        """(name, value) in file order, one value in memory at a time."""
        for name in self.entries:
            yield name, self.load(name)

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_ckpt(path: str, verify_crc: bool = True) -> dict:
    """Every entry of a .ckpt as a dict of tensors (and strings), like mindspore.load_checkpoint."""
    with CkptReader(path, verify_crc=verify_crc) as reader:
        return {name: reader.load(name) for name, entry in reader.entries.items() if not entry.is_map}
