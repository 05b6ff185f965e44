"""Error answers of the edge, in the one shape every hop uses
(`httpcontract.problem`: RFC 9457 problem details with a stable `code`).

`EdgeError` carries an HTTP status and a code; the request middleware turns
any that escapes a handler into that shape, so a handler may either raise
one or return `error_response(...)` directly."""

from __future__ import annotations

from aiohttp import web

from httpcontract import problem
from httpcontract.request_id import HEADER as REQUEST_ID


class EdgeError(Exception):
    """A client-facing failure: `status`, a stable machine `code`, a sentence."""

    status = 500
    code = "internal_error"

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.close = close

    def response(self, request_id: str | None) -> web.Response:
        return error_response(self.status, self.code, self.detail, request_id, self.headers, self.close)


def error_response(status: int, code: str, detail: str, request_id: str | None = None,
                   headers: dict[str, str] | None = None, close: bool = False) -> web.Response:
    resp = web.Response(body=problem.encode(status, code, detail, request_id), status=status, headers=headers,
                        content_type=problem.CONTENT_TYPE)
    if request_id:
        resp.headers[REQUEST_ID] = request_id
    if close:
        # The request body was not read: the connection cannot be reused.
        resp.force_close()
    return resp
