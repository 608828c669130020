"""Reading request bodies: size limits and JSON decoding mapped to the error envelope."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from router.errors import PayloadTooLarge, ValidationFailed


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object.

    The app's ``client_max_size`` (``settings.max_body_bytes``) bounds it: PAYLOAD_TOO_LARGE
    beyond that; VALIDATION_FAILED for malformed JSON or anything but an object.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("request body too large") from None
    if not raw:
        raise ValidationFailed("a JSON object body is required", field="body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValidationFailed("body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise ValidationFailed("body must be a JSON object", field="body")
    return data
