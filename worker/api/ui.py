"""What the pages share: their templates and static files (no front-end build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from worker.settings import Settings

HERE = Path(__file__).parent
#: Server-rendered pages; Jinja escapes every value (prompts are user input).
templates = Jinja2Templates(directory=HERE / "templates")
#: Pages send these: no page is cached, and no URL of a page (its token) leaves as a Referer.
PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def mount_static(app: FastAPI) -> None:
    """The pages' script and style sheet, at /ui/static (no auth: nothing in them is secret)."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")


def allow_origins(app: FastAPI, settings: Settings) -> None:
    """UI_ALLOWED_ORIGINS may GET (a frontend's own EventSource, fetch or <video> with a watch
    token); no cookies are ever accepted, and every other origin gets no CORS answer."""
    origins = [origin.strip() for origin in settings.ui_allowed_origins.split(",")]
    if origins := [origin for origin in origins if origin]:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET"],
                           allow_credentials=False)  # fmt: skip
