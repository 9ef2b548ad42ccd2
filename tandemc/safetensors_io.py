"""Reading and writing the safetensors format, strictly and without pickle.

Layout: 8-byte little-endian header length N, N bytes of JSON header ({name: {dtype, shape, data_offsets}},
optional "__metadata__"), then the raw little-endian tensor bytes. Our own reader checks every offset against the
file size so a truncated or corrupted file is reported by name instead of failing deep inside a library, and
refuses what the reference implementation (the `safetensors` package) refuses. Our own code rather than that
package because artifacts store int4 weights (the I4 dtype below), which it cannot read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from tandemc.errors import TandemcError
from tandemc.params import np_dtype

DTYPE_CODES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "I4": "int4",  # tandemc extension for quantized artifact weights: two per byte, first in the low nibble (as ONNX)
}
CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
MAX_HEADER = 100 * 1024 * 1024


def dtype_name(array) -> str:
    name = np.dtype(array.dtype).name
    if name not in CODE_OF:
        raise TandemcError(f"cannot store dtype {name} in safetensors")
    return name


def nbytes(count: int, dtype: str) -> int:
    return (count + 1) // 2 if dtype == "int4" else count * np_dtype(dtype).itemsize


def pack_int4(array: np.ndarray) -> np.ndarray:
    """int4 values → bytes, two per byte in row-major order, the first in the low nibble."""
    nibbles = (np.asarray(array).astype(np.int8).reshape(-1) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
    return ((nibbles ^ 8) - 8).astype(np_dtype("int4")).reshape(shape)


def read_header(path: Path) -> tuple[dict, int, int]:
    """(tensor entries, offset where data starts, data length), as strict as the `safetensors` package: every
    field of the right type, each tensor's byte span matching its dtype and shape, the spans contiguous from the
    start of the data section to its end (no gaps, overlaps or trailing bytes)."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TandemcError(f"{name} is truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise TandemcError(f"{name} is truncated or not safetensors: header claims {n} bytes, file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise TandemcError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = e.__class__.__name__ if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise TandemcError(f"{name} has a corrupt safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise TandemcError(f"{name} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TandemcError(f"{name}: the safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for tensor, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise TandemcError(f"{name}: header entry for tensor '{tensor}' is malformed (needs dtype, shape and "
                               "data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_CODES:
            raise TandemcError(f"{name}: tensor '{tensor}' has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise TandemcError(f"{name}: tensor '{tensor}' has a malformed shape {shape!r} (a list of "
                               "non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise TandemcError(f"{name}: tensor '{tensor}' has malformed data_offsets {offsets!r} (two integers, "
                               "begin <= end)")
        begin, end = offsets
        expected = nbytes(math.prod(shape), DTYPE_CODES[dtype])
        if end - begin != expected:
            raise TandemcError(f"{name}: tensor '{tensor}' spans {end - begin} bytes but dtype {dtype} shape "
                               f"{tuple(shape)} needs {expected}")
        spans.append((begin, end, tensor))
    position, last = 0, None
    for begin, end, tensor in sorted(spans):
        if begin != position:
            raise TandemcError(f"{name}: tensor '{tensor}' starts at byte {begin} of the data section where "
                               f"{position} was expected: tensors must be contiguous and must not overlap")
        position, last = end, tensor
    if position > data_len:
        raise TandemcError(f"{name} is truncated: tensor '{last}' ends at byte {position} of the data section "
                           f"but only {data_len} bytes are present")
    if position < data_len:
        raise TandemcError(f"{name} has {data_len - position} bytes after its last tensor's data; the file is "
                           "corrupt or not what its header says")
    return header, 8 + n, data_len


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors, memory-mapped read-only (no copy until used)."""
    path = Path(path)
    header, start, data_len = read_header(path)
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len else b""
    out = {}
    for tensor, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] == "I4":
            out[tensor] = unpack_int4(np.frombuffer(data[begin:end], np.uint8), entry["shape"])
            continue
        dtype = np_dtype(DTYPE_CODES[entry["dtype"]]).newbyteorder("<")
        out[tensor] = np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"])
    return out


def tensor_locations(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """name → (absolute byte offset, byte length) of each tensor's raw data in the file."""
    header, start, _ = read_header(Path(path))
    return {name: (start + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
            for name, e in header.items()}


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Deterministic: tensors in sorted name order, no timestamps, header padded to 8 bytes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        header[name] = {"dtype": CODE_OF[dtype_name(array)], "shape": list(array.shape)}
        if dtype_name(array) == "int4":
            array = pack_int4(array)
        header[name]["data_offsets"] = [offset, offset + array.nbytes]
        arrays.append(array)
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
