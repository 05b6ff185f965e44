"""Error answers of the edge: JSON with a stable error code and a sentence."""

from __future__ import annotations

from aiohttp import web


def error_response(status: int, error: str, detail: str, request_id: str | None = None,
                   headers: dict[str, str] | None = None, close: bool = False) -> web.Response:
    body: dict[str, str] = {"error": error, "detail": detail}
    if request_id:
        body["request_id"] = request_id
    resp = web.json_response(body, status=status, headers=headers)
    if request_id:
        resp.headers["X-Request-ID"] = request_id
    if close:
        # The request body was not read: the connection cannot be reused.
        resp.force_close()
    return resp
