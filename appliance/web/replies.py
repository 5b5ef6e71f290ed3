"""JSON replies and request bodies shared by the API's handler modules."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def reply(obj: Any, status_code: int = 200) -> web.Response:
    return web.json_response(obj, status=status_code)


def error(status_code: int, message: str, **extra: Any) -> web.Response:
    """`{"error": message, ...}`; a message about one field starts with its name."""
    return reply({"error": message, **extra}, status_code)


async def body_of(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 400 when it is not one."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='{"error": "body: not JSON"}',
                                 content_type="application/json") from None  # fmt: skip
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "body: must be a JSON object"}',
                                 content_type="application/json")  # fmt: skip
    return body
