"""Reading and writing the safetensors format, strictly and without pickle.

Layout: 8-byte little-endian header length N, N bytes of JSON header ({name: {dtype, shape, data_offsets}},
optional "__metadata__"), then the raw little-endian tensor bytes. Our own reader checks every offset against the
file size so a truncated or corrupted file is reported by name instead of failing deep inside a library.
"""

from __future__ import annotations

import json
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
    """(tensor entries, offset where data starts, data length), validated against the file size."""
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TandemcError(f"{name} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise TandemcError(f"{name} is truncated or not safetensors: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TandemcError(f"{name} has a corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise TandemcError(f"{name} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for tensor, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TandemcError(f"{name}: header entry for tensor '{tensor}' is malformed") from None
        if dtype not in DTYPE_CODES:
            raise TandemcError(f"{name}: tensor '{tensor}' has unsupported dtype {dtype}")
        expected = nbytes(int(np.prod(shape, dtype=np.int64)), DTYPE_CODES[dtype])
        if end - begin != expected or begin < 0:
            raise TandemcError(f"{name}: tensor '{tensor}' spans {end - begin} bytes but dtype {dtype} shape "
                               f"{tuple(shape)} needs {expected}")
        if end > data_len:
            raise TandemcError(f"{name} is truncated: tensor '{tensor}' ends at byte {end} of the data section "
                               f"but only {data_len} bytes are present")
    return header, 8 + n, data_len


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
