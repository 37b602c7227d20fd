"""The built-in web chat page: `GET /` answers `static/index.html`, `/static/*` its script, style sheet and the
vendored Markdown libraries (marked + DOMPurify). Plain files, no build step and nothing fetched from elsewhere.

The page talks to the server's own OpenAI API (`/v1/models`, `/v1/chat/completions` streamed as SSE) from the
browser. The API key check covers /v1/* only, so the page itself loads without a key; the key typed into the page is
kept in the browser's localStorage and sent as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().with_name("static")


def mount_web(app: FastAPI) -> None:
    """Serve the chat page at `/` and its files under `/static` on `app`. Idempotent: an app that already has a `/`
    route (or a `/static` mount) keeps it, so calling this twice (or after `create_app` did) changes nothing."""
    paths = {getattr(route, "path", None) for route in app.router.routes}
    index = STATIC_DIR / "index.html"
    if "/" not in paths:
        async def web_index() -> FileResponse:
            # no-cache: the browser revalidates (ETag), so an upgraded server's page is picked up at once
            return FileResponse(index, media_type="text/html", headers={"cache-control": "no-cache"})

        app.add_api_route("/", web_index, methods=["GET", "HEAD"], include_in_schema=False)
    if "/static" not in paths:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
