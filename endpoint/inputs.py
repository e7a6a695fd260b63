"""Reading what a client sent: query parameters, numbers and the enqueue payload.

Every check raises InputError with the HTTP status and a message that says what is wrong;
nothing here touches the store, so a rejected request changes nothing.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import BinaryIO
from urllib.parse import parse_qsl

import multipart

# Room for multipart boundaries and part headers around a payload of the maximum size.
FORM_OVERHEAD_BYTES = 64 * 1024
_DIGITS = re.compile(r"[0-9]{1,18}")
_SIGNED_INTEGER = re.compile(r"[+-]?[0-9]+")


class InputError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def query_params(query_string: str) -> dict[str, str]:
    """Query parameters with lower-cased names (clients send `Iterations=10`).

    Values keep their exact bytes as latin-1 text, the way WSGI hands over the query
    string, so `buffer=...` round-trips binary data. A name given twice is refused
    rather than guessed at.
    """
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query_string, keep_blank_values=True, encoding="latin-1", errors="strict")
    except ValueError as exc:
        raise InputError(400, f"malformed query string: {exc}") from exc
    for name, value in pairs:
        key = name.lower()
        if key in params:
            raise InputError(400, f"query parameter {key!r} is given more than once")
        params[key] = value
    return params


def positive_int(params: dict[str, str], name: str, maximum: int) -> int:
    raw = params.get(name)
    if raw is None:
        raise InputError(400, f"query parameter {name!r} is required")
    text = raw.strip()
    if not _DIGITS.fullmatch(text):
        if _SIGNED_INTEGER.fullmatch(text):
            raise InputError(400, f"{name} must be a positive integer, got {raw!r}")
        raise InputError(400, f"{name} must be an integer, got {raw[:40]!r}")
    value = int(text)
    if value < 1:
        raise InputError(400, f"{name} must be at least 1, got {value}")
    if value > maximum:
        raise InputError(400, f"{name} must be at most {maximum}, got {value}")
    return value


def read_body(stream: BinaryIO, content_length_header: str, max_payload_bytes: int, chunked: bool = False) -> bytes:
    """The request body, refused with 413 before reading when its declared length is too large.

    A chunked body has no declared length: it is read up to one byte past the limit."""
    limit = max_payload_bytes + FORM_OVERHEAD_BYTES
    if not content_length_header.strip():
        if not chunked:
            return b""
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise InputError(413, f"request body is over the payload limit of {max_payload_bytes} bytes")
        return body
    if not _DIGITS.fullmatch(content_length_header.strip()):
        raise InputError(400, f"malformed Content-Length {content_length_header[:40]!r}")
    content_length = int(content_length_header)
    if content_length > limit:
        raise InputError(
            413,
            f"request body of {content_length} bytes is over the payload limit of {max_payload_bytes} bytes"
            f" (+{FORM_OVERHEAD_BYTES} for form encoding)",
        )
    return stream.read(content_length) if content_length else b""


def payload_from(
    body: bytes, content_type: str, params: dict[str, str], max_payload_bytes: int
) -> bytes:
    """The enqueue payload: form field `data`, else query parameter `buffer`, else the raw body."""
    media_type, _, options = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type == "multipart/form-data":
        data = _multipart_field(body, options, "data", max_payload_bytes)
        if data is None:
            raise InputError(400, "multipart upload has no field named 'data'")
    elif media_type == "application/x-www-form-urlencoded":
        # curl sends raw files with --data-binary under this type too, so a body
        # that is not a form with a `data` field is taken as the payload itself.
        data = _urlencoded_field(body, "data")
    else:
        data = None
    if data is None:
        data = params["buffer"].encode("latin-1") if "buffer" in params else body
    if not data:
        raise InputError(400, "payload is empty: send form field 'data', query parameter 'buffer' or a request body")
    if len(data) > max_payload_bytes:
        raise InputError(413, f"payload of {len(data)} bytes exceeds the limit of {max_payload_bytes} bytes")
    return data


def _urlencoded_field(body: bytes, name: str) -> bytes | None:
    if b"=" not in body:
        return None
    for key, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
        if key == name:
            return value.encode("latin-1")
    return None


def _multipart_field(body: bytes, options: str, name: str, max_payload_bytes: int) -> bytes | None:
    _, header_options = multipart.parse_options_header("multipart/form-data;" + options)
    boundary = header_options.get("boundary")
    if not boundary:
        raise InputError(400, "multipart Content-Type has no boundary")
    parser = multipart.MultipartParser(
        BytesIO(body),
        boundary,
        len(body),
        partsize_limit=max_payload_bytes + 1,
        spool_limit=max_payload_bytes + 1,
        memory_limit=2 * (max_payload_bytes + FORM_OVERHEAD_BYTES),
    )
    try:
        for part in parser:
            if part.name == name:
                return part.raw
    except multipart.ParserLimitReached as exc:
        message = f"multipart body over a limit ({exc}); payloads may have {max_payload_bytes} bytes"
        raise InputError(413, message) from exc
    except multipart.MultipartError as exc:
        raise InputError(400, f"malformed multipart body: {exc}") from exc
    return None
