"""The built-in web chat page: `GET /` answers `static/index.html`, `/static/*` its script, style sheet and the
vendored Markdown libraries (marked + DOMPurify). Plain files, no build step and nothing fetched from elsewhere.

The page talks to the server's own OpenAI API (`v1/models`, `v1/chat/completions` streamed as SSE) from the
browser. Every URL in the page is relative (`static/app.js`, `v1/chat/completions`), resolved against the page's own
address, so the page also works behind a reverse proxy that serves the server under a sub-path (`/chat/` ->
`/chat/static/app.js`, `/chat/v1/...`) as long as the page's address ends with `/`. The API key check covers /v1/*
only, so the page itself loads without a key; the key typed into the page is kept in the browser's localStorage and
sent as `Authorization: Bearer <key>`.

The page and its files go out with security headers (`SECURITY_HEADERS`): the Content-Security-Policy (only this
server's own scripts, styles and API; no inline script; `frame-ancestors 'none'`, which a <meta> policy cannot set)
and `X-Frame-Options: DENY` against clickjacking, `nosniff` and `no-referrer`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().with_name("static")

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:", "connect-src 'self'",
    "object-src 'none'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class _StaticFiles(StaticFiles):
    """StaticFiles whose every answer (files, 304s, 404s) carries `SECURITY_HEADERS`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except HTTPException as exc:  # 404 and 405 are raised: answer them here, with the headers too
            response = PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_web(app: FastAPI) -> None:
    """Serve the chat page at `/` and its files under `/static` on `app`. Idempotent: an app that already has a `/`
    route (or a `/static` mount) keeps it, so calling this twice (or after `create_app` did) changes nothing."""
    paths = {getattr(route, "path", None) for route in app.router.routes}
    index = STATIC_DIR / "index.html"
    if "/" not in paths:
        async def web_index() -> FileResponse:
            # no-cache: the browser revalidates (ETag), so an upgraded server's page is picked up at once
            headers = {"cache-control": "no-cache", **SECURITY_HEADERS}
            return FileResponse(index, media_type="text/html", headers=headers)

        app.add_api_route("/", web_index, methods=["GET", "HEAD"], include_in_schema=False)
    if "/static" not in paths:
        app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
