"""The safetensors file format: an 8-byte little-endian header length, a JSON header, the data.

We read and write it ourselves (rather than through ``safetensors.safe_open``) so that one tensor
at a time is in memory, a truncated file is detected from its header before anything is computed,
and a writer can put the header down first and stream tensors after it.
"""

from __future__ import annotations

import json
import struct

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def read_header(f) -> tuple[dict, int]:
    """Parse the header of an open file; returns (header dict, offset of the data section).

    Raises ValueError with a short reason if the header is not valid safetensors.
    """
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"header length {length} is implausible")
    text = f.read(length)
    if len(text) < length:
        raise ValueError("file ends inside its header")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + length


def encode_header(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included), padded with spaces to an 8-byte boundary."""
    body = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body
