"""Facts about a model directory that results and caches record: its name and revision."""

from __future__ import annotations

import hashlib
from pathlib import Path


def model_revision(path: Path) -> str:
    """A short fingerprint of a model directory: file names, sizes and modification times.

    Reading 15 GB of weights to hash them would cost more than the generation it saves;
    a changed or re-copied model gets a new revision, which only costs a cache miss.
    """
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
