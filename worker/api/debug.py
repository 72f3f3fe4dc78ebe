"""GET /debug/env: which settings are set, never a secret's value or any part of it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from worker.api.auth import Authorized
from worker.settings import Settings, get_settings

router = APIRouter(dependencies=[Authorized], tags=["debug"])


class EnvView(BaseModel):
    """Settings by environment variable: secrets as 'set'/'unset', URL credentials masked."""

    settings: dict[str, str]


@router.get("/debug/env")
def debug_env(settings: Annotated[Settings, Depends(get_settings)]) -> EnvView:
    return EnvView(settings={name.upper(): value for name, value in settings.masked().items()})
