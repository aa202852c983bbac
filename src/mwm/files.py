"""Atomic file writes: every output appears whole or not at all.

A writer creates a temporary file in the destination folder and renames it over the
target, so a killed job never leaves a half-written PNG, CSV or JSON that a later
resume would mistake for a finished output.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json_or_none(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None when the file is missing or unreadable (a stamp check)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
              fieldnames: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(path, buf.getvalue())


def write_png(path: str | os.PathLike, image: np.ndarray, text: Mapping[str, str] | None = None) -> None:
    """Write a uint8/uint16 gray (H, W) or RGB (H, W, 3) array as PNG, atomically.

    ``text`` entries are stored as PNG ``tEXt`` chunks (read back with
    :func:`read_png_text`); MWM uses them to record how an output was made.
    """
    import cv2

    if image.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"write_png needs uint8 or uint16, got {image.dtype} for {path}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    data = encoded.tobytes()
    if text:
        data = _insert_png_text(data, text)
    write_bytes(path, data)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _insert_png_text(png: bytes, text: Mapping[str, str]) -> bytes:
    """Insert tEXt chunks right after IHDR (signature 8 bytes + IHDR chunk 25 bytes)."""
    chunks = []
    for key, value in text.items():
        payload = key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace")
        body = b"tEXt" + payload
        chunks.append(len(payload).to_bytes(4, "big") + body
                      + zlib.crc32(body).to_bytes(4, "big"))
    head = len(_PNG_SIGNATURE) + 25
    return png[:head] + b"".join(chunks) + png[head:]


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG file (stops at the image data; {} if unreadable)."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != _PNG_SIGNATURE:
                return out
            while True:
                header = handle.read(8)
                if len(header) < 8:
                    return out
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind in (b"IDAT", b"IEND"):
                    return out
                payload = handle.read(length)
                handle.read(4)  # CRC
                if kind == b"tEXt" and b"\0" in payload:
                    key, value = payload.split(b"\0", 1)
                    out[key.decode("latin-1")] = value.decode("latin-1")
    except OSError:
        return out


def safe_child(out_dir: str | os.PathLike, name: str) -> Path:
    """Return ``out_dir/name``, refusing names that would escape ``out_dir``.

    Output names are derived from input names (file stems, prompt keys); a name such as
    ``../../etc/x`` or an absolute path must never write outside the output folder.
    """
    out_dir = Path(out_dir).resolve()
    candidate = (out_dir / name).resolve()
    if candidate != out_dir and out_dir not in candidate.parents:
        raise ValueError(f"output name {name!r} would leave the output folder {out_dir}")
    return candidate


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
