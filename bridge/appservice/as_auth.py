"""The appservice endpoints check the homeserver's token before anything reads the request body.

mautrix checks ``hs_token`` inside each handler, with ``!=``, and our transaction gate
(transactions.py) reads the body of a transaction before that handler runs (to recognise a
retried transaction): anyone who could reach the port could make the bridge buffer up to
``appservice.max_body_size`` per request without a token. This middleware, the outermost of
the appservice's web app, answers every appservice path (``/_matrix/app/...`` and the legacy
``/transactions``, ``/users``, ``/rooms``) 401 without a token and 403 with a wrong one,
compared in constant time, and 413 when the declared body is over ``max_body_size``, all
before the body is read; the connection is then closed, so the unread body is never taken in.
The token is read as mautrix reads it: the ``access_token`` query parameter first, else the
``Authorization: Bearer`` header.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from .. import health

if TYPE_CHECKING:
    from ..context import BridgeContext

_LEGACY = ("/transactions/", "/users/", "/rooms/")
_MIB = 1024 * 1024


def is_appservice_path(path: str) -> bool:
    return path.startswith("/_matrix/app/") or path.startswith(_LEGACY)


def presented_token(request: web.Request) -> str | None:
    token = request.rel_url.query.get("access_token")
    if token is not None:
        return token
    header = request.headers.get("Authorization")
    if header is None or not header.startswith("Bearer "):
        return None
    return header.removeprefix("Bearer ")


def install(bridge: BridgeContext) -> None:
    expected = str(bridge.config["appservice.hs_token"]).encode()
    max_body = int(bridge.config["appservice.max_body_size"]) * _MIB

    async def refuse(
        request: web.Request, status: int, errcode: str, error: str
    ) -> web.StreamResponse:
        response = web.json_response({"errcode": errcode, "error": error}, status=status)
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        # Then close at once: aiohttp would otherwise read (and discard) the unread body for
        # up to 10 s before closing ("lingering"). The answer is flushed before the close.
        request.protocol.force_close()
        return response

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_appservice_path(request.path):
            return await handler(request)
        token = presented_token(request)
        if token is None:
            return await refuse(request, 401, "M_UNAUTHORIZED", "missing homeserver token")
        if not hmac.compare_digest(token.encode(), expected):
            return await refuse(request, 403, "M_FORBIDDEN", "invalid homeserver token")
        length = request.content_length
        if length is not None and length > max_body:
            if "/transactions/" in request.path:  # Synapse will send it again: say so loudly
                txn_id = request.path.rpartition("/")[2]
                health.TRANSACTIONS.refuse(txn_id, f"{length} bytes, over max_body_size")
            return await refuse(request, 413, "M_TOO_LARGE", f"body over {max_body // _MIB} MiB")
        return await handler(request)  # aiohttp's client_max_size bounds a chunked body

    bridge.az.app.middlewares.insert(0, check_token)
