"""Storage backends: where finished files go, at the paths of CONTRACT.md section 3.

`local` writes under OUTPUT_DIR/{bucket}/{path}; `supabase` uploads with supabase-py.
Both overwrite (upsert), so a retried upload never leaves a second copy. A stored file is
shown to a browser (the job page) from its local path, or by a signed URL of Supabase's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

import httpx

from worker.errors import TransientError, error_for_status
from worker.settings import Settings

log = logging.getLogger(__name__)


class Storage(Protocol):
    def upload(self, bucket: str, key: str, source: Path, *, content_type: str) -> None: ...


class LocalStorage:
    """Files under a directory, laid out as the bucket would be."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def upload(self, bucket: str, key: str, source: Path, *, content_type: str) -> None:
        target = self.root / bucket / key
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)

    def path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key


class SupabaseStorage:
    """Supabase Storage through supabase-py, errors translated into retry-or-fail."""

    def __init__(self, url: str, service_key: str) -> None:
        from supabase import create_client  # import cost paid only where this backend is used

        self.client = create_client(url, service_key)

    def upload(self, bucket: str, key: str, source: Path, *, content_type: str) -> None:
        from storage3.exceptions import StorageApiError

        what = f"upload {bucket}/{key}"
        try:
            self.client.storage.from_(bucket).upload(
                key, source, file_options={"content-type": content_type, "upsert": "true"}
            )
        except StorageApiError as e:
            status = int(e.status) if str(e.status).isdigit() else 500
            raise error_for_status(status, f"{what}: {e.message}") from e
        except httpx.TransportError as e:
            raise TransientError(f"{what}: {type(e).__name__}: {e}") from e

    def signed_url(self, bucket: str, key: str, *, expires_s: int) -> str:
        """A URL that reads the file without a key for `expires_s` (the bucket stays private)."""
        from storage3.exceptions import StorageApiError

        what = f"sign {bucket}/{key}"
        try:
            return self.client.storage.from_(bucket).create_signed_url(key, expires_s)["signedURL"]
        except StorageApiError as e:
            status = int(e.status) if str(e.status).isdigit() else 500
            raise error_for_status(status, f"{what}: {e.message}") from e
        except httpx.TransportError as e:
            raise TransientError(f"{what}: {type(e).__name__}: {e}") from e


def make_storage(settings: Settings) -> Storage:
    """The backend STORAGE_BACKEND names, with a clear error for missing settings."""
    if settings.storage_backend == "local":
        return LocalStorage(settings.output_dir)
    if not settings.supabase_url or not settings.supabase_service_key:
        raise ValueError("STORAGE_BACKEND=supabase needs SUPABASE_URL and SUPABASE_SERVICE_KEY")
    return SupabaseStorage(settings.supabase_url, settings.supabase_service_key.get_secret_value())
