"""File checks before upload: a broken file must fail the job here, not reach a user."""

from __future__ import annotations

import struct
from pathlib import Path

from worker.errors import MediaCheckFailed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Anything smaller is certainly broken (headers alone come close to these sizes).
MIN_BYTES = {"mp4": 1_024, "png": 67, "webp": 26}


def mp4_top_level_boxes(path: Path) -> list[str]:
    """The names of the top-level MP4 boxes, in file order.

    Raises MediaCheckFailed for a box shorter than its header (a 64-bit size of 0 would
    otherwise seek back and loop forever) or one running past the end of the file (cut short).
    """
    names = []
    file_size = path.stat().st_size
    with path.open("rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                break
            start = f.tell() - 8
            size, name = struct.unpack(">I4s", header)
            header_size = 8
            if size == 1:  # 64-bit size follows the name
                large = f.read(8)
                if len(large) < 8:
                    break
                size, header_size = struct.unpack(">Q", large)[0], 16
            elif size == 0:  # box runs to the end of the file
                names.append(name.decode("latin-1"))
                break
            if size < header_size or start + size > file_size:
                raise MediaCheckFailed(
                    f"{path.name}: box {name!r} at byte {start} claims {size} bytes"
                    f" ({file_size} in the file): broken or cut short"
                )
            f.seek(start + size)
            names.append(name.decode("latin-1"))
    return names


def check_file(path: Path, kind: str) -> int:
    """Check signature and size of an mp4, png or webp file; return its size in bytes."""
    size = path.stat().st_size if path.exists() else 0
    if size < MIN_BYTES[kind]:
        raise MediaCheckFailed(f"{path.name}: {size} bytes is too small for a {kind} file")
    with path.open("rb") as f:
        head = f.read(16)
    if kind == "mp4":
        _check_mp4(path, head)
    elif kind == "png" and not head.startswith(PNG_SIGNATURE):
        raise MediaCheckFailed(f"{path.name}: no PNG signature")
    elif kind == "webp" and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise MediaCheckFailed(f"{path.name}: no RIFF/WEBP signature")
    return size


def _check_mp4(path: Path, head: bytes) -> None:
    if head[4:8] != b"ftyp":
        raise MediaCheckFailed(f"{path.name}: no 'ftyp' box at byte 4")
    boxes = mp4_top_level_boxes(path)
    if "moov" not in boxes or "mdat" not in boxes:
        raise MediaCheckFailed(f"{path.name}: missing moov or mdat box ({boxes})")
    if boxes.index("moov") > boxes.index("mdat"):
        raise MediaCheckFailed(f"{path.name}: moov after mdat, not faststart")
