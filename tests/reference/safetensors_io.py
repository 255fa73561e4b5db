"""Tiny safetensors reader/writer: json + struct + numpy + torch, no `safetensors` package.

Layout (https://github.com/huggingface/safetensors, the same as our C++ src/checkpoint.cpp):

    u64 little-endian N | N bytes of UTF-8 JSON header | raw little-endian tensor data

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the start of the data section) plus an optional "__metadata__" object whose values
are strings. The writer pads the header with spaces so that 8 + N is a multiple of 8, lays the
tensors out contiguously in the order given, and writes atomically (temp file, fsync, rename).
The reader validates everything it relies on and raises ValueError naming the file.

    tensors, metadata = load(path)         # dict name -> torch.Tensor (CPU), dict str -> str
    save(path, tensors, metadata=None)     # tensors: dict name -> torch.Tensor | np.ndarray
"""
import json
import os
import struct
import tempfile

import numpy as np
import torch

# safetensors dtype -> (numpy little-endian dtype, torch dtype). BF16 has no numpy type: its
# bytes travel as int16 and are reinterpreted by torch.
_DTYPES = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<i2"), torch.bfloat16),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}
_TORCH_TO_ST = {tdt: name for name, (_, tdt) in _DTYPES.items()}
_NUMPY_TO_ST = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
                np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
                np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
                np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}

MAX_HEADER = 100 * 1024 * 1024  # same sanity limit as the reference implementation


def _to_torch(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().contiguous()
    arr = np.ascontiguousarray(t)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # native order for torch
    if arr.dtype not in _NUMPY_TO_ST:
        raise ValueError(f"unsupported numpy dtype {arr.dtype}")
    return torch.from_numpy(arr)


def _raw_bytes(t):
    """Little-endian bytes of a contiguous CPU tensor, as a buffer (no copy where possible)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    if arr.dtype.byteorder == ">":  # never on x86/ARM, kept for correctness
        arr = arr.byteswap().newbyteorder()
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def header_bytes(entries, metadata):
    """The padded header (without the 8-byte length) for entries [(name, dtype, shape, nbytes)]."""
    header = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"__metadata__ must map str to str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in entries:
        if name == "__metadata__":
            raise ValueError("tensor name __metadata__ is reserved")
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % 8)
    return raw


def save(path, tensors, metadata=None):
    """Writes `tensors` (dict name -> torch.Tensor or numpy array) atomically to `path`."""
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad tensor name {name!r}")
        t = _to_torch(t)
        if t.dtype not in _TORCH_TO_ST:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        items.append((name, t))
    entries = [(n, _TORCH_TO_ST[t.dtype], list(t.shape), t.numel() * t.element_size())
               for n, t in items]
    header = header_bytes(entries, metadata)

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for _, t in items:
                if t.numel():
                    f.write(_raw_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path):
    """Returns (tensors, metadata): dict name -> CPU torch.Tensor, dict str -> str."""
    def bad(what):
        return ValueError(f"{path}: invalid safetensors file: {what}")

    with open(path, "rb") as f:
        buf = bytearray(f.read())
    if len(buf) < 8:
        raise bad("shorter than 8 bytes")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER or 8 + n > len(buf):
        raise bad(f"header length {n} exceeds the file ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})")
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must be an object of strings")

    data_start = 8 + n
    data_len = len(buf) - data_start
    spans = []
    tensors = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in _DTYPES:
            raise bad(f"tensor {name}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise bad(f"tensor {name}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) for o in offs) and 0 <= offs[0] <= offs[1] <= data_len):
            raise bad(f"tensor {name}: data_offsets {offs!r} outside the data section ({data_len} bytes)")
        npdt, tdt = _DTYPES[dtype]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if offs[1] - offs[0] != numel * npdt.itemsize:
            raise bad(f"tensor {name}: {offs[1] - offs[0]} bytes for {dtype} shape {shape}")
        spans.append((offs[0], offs[1], name))
        start = data_start + offs[0]
        if numel == 0:
            t = torch.empty(shape, dtype=tdt)
        else:
            arr = np.frombuffer(buf, dtype=npdt, count=numel, offset=start)
            if start % npdt.itemsize:  # unaligned: copy to an aligned array
                arr = arr.copy()
            arr = arr.astype(npdt.newbyteorder("="), copy=False).reshape(shape)
            t = torch.from_numpy(arr)
            if tdt == torch.bfloat16:
                t = t.view(torch.bfloat16)
        tensors[name] = t
    # Like the reference reader: the tensors tile the data section exactly, no gaps or overlaps.
    pos = 0
    for b, e, name in sorted(spans):
        if b != pos:
            raise bad(f"tensor {name}: data_offsets start at {b}, expected {pos} (gap or overlap)")
        pos = e
    if pos != data_len:
        raise bad(f"data section is {data_len} bytes but tensors cover {pos}")
    return tensors, metadata
