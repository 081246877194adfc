"""Check that a weights file is a whole safetensors file before any library reads it, so a truncated file, a
huge header or something else entirely (a symlink to /etc/passwd, say) is one clear error naming the file instead
of a raw ``SafetensorError`` from deep inside a loader."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def check_safetensors_file(path: Path, what: str = "weights file") -> None:
    """Refuse ``path`` unless its header is valid safetensors and every tensor lies inside the file."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path} ({what}) is not a valid safetensors file: {why}. Re-download or re-save it "
                           "with safetensors.")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise refuse(f"it has {size} bytes, fewer than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise refuse(f"its header claims {length} bytes but the file has {size}")
            raw = fh.read(length)
    except OSError as err:
        raise ConfigError(f"{path} ({what}) cannot be read: {err.strerror or err}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse("its header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise refuse(f"tensor {name!r} lies outside the file's {data_size} data bytes (truncated?)")
