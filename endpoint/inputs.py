"""Reading what a client sent: query parameters, numbers and the enqueue payload.

Every check raises InputError with the HTTP status and a message that says what is wrong;
nothing here touches the store, so a rejected request changes nothing.
"""

from __future__ import annotations

import re
from io import BytesIO
from urllib.parse import parse_qsl, unquote_to_bytes

import multipart

# Room for multipart boundaries and part headers around a payload of the maximum size.
FORM_OVERHEAD_BYTES = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")
_SIGNED_DIGITS = re.compile(r"[+-][0-9]+")
_LARGEST_SHOWN = 40  # characters of a bad value that an error message repeats
# A urlencoded form as HTML and curl -d write it: `name=value` fields joined by `&`, names and
# values made of unreserved characters, `+` and %XX escapes only. Checked with byte-string
# scans that run at C speed: one regular expression over the body took 1.2 s for 4 MiB.
_FORM_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+%=&"
_NOT_SEPARATORS = bytes(byte for byte in range(256) if byte not in b"=&")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DATA_FIELD = re.compile(rb"data=([^&]*)")

class InputError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def shown(text: str) -> str:
    """A client's text as it sent it, for an error message: WSGI hands over query strings and
    paths as latin-1, but clients write UTF-8."""
    raw = text.encode("latin-1", errors="replace")
    decoded = raw.decode("utf-8", errors="backslashreplace")
    return decoded if len(decoded) <= _LARGEST_SHOWN else decoded[:_LARGEST_SHOWN] + "..."


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
        key = name.lower() if name.isascii() else name  # str.lower() would change the latin-1 stand-ins
        if key in params:
            raise InputError(400, f"query parameter {shown(key)!r} is given more than once")
        params[key] = value
    return params


def positive_int(params: dict[str, str], name: str, maximum: int) -> int:
    """A query parameter written as plain digits, from 1 to `maximum`."""
    raw = params.get(name)
    if raw is None:
        raise InputError(400, f"query parameter {name!r} is required")
    if not _DIGITS.fullmatch(raw):
        raise InputError(400, f"{name} must be {_what_is_wrong(raw)}, got {shown(raw)!r}")
    if len(raw.lstrip("0")) > len(str(maximum)):
        raise InputError(400, f"{name} is too large: at most {maximum}, got {shown(raw)}")
    value = int(raw)
    if value < 1:
        raise InputError(400, f"{name} must be at least 1, got {value}")
    if value > maximum:
        raise InputError(400, f"{name} must be at most {maximum}, got {value}")
    return value


def _what_is_wrong(raw: str) -> str:
    text = raw.strip()
    if text != raw and _DIGITS.fullmatch(text):
        return "plain digits without spaces (in a URL, '+' stands for a space: write %2B or nothing)"
    if _SIGNED_DIGITS.fullmatch(text):
        return "a positive integer" if text.startswith("-") else "plain digits, without a '+' sign"
    return "an integer"


def payload_from(body: bytes, content_type: str, params: dict[str, str], max_payload_bytes: int) -> bytes:
    """The enqueue payload: the form field `data`, else the query parameter `buffer`, else the raw body.

    A urlencoded body counts as a form only when it is one (see `_URLENCODED_FORM`) and has a
    `data` field: curl sends files with --data-binary under the form content type too, so any
    other body is the raw payload. A `data` field given twice is refused, like a parameter."""
    media_type, _, options = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type == "multipart/form-data":
        data = _multipart_field(body, options, "data", max_payload_bytes)
        if data is None and "buffer" not in params:
            raise InputError(400, "multipart upload has no field 'data' and there is no query parameter 'buffer'")
    elif media_type == "application/x-www-form-urlencoded":
        data = _urlencoded_data(body)
    else:
        data = None
    if data is None:
        data = params["buffer"].encode("latin-1") if "buffer" in params else body
    if not data:
        raise InputError(400, "payload is empty: send form field 'data', query parameter 'buffer' or a request body")
    if len(data) > max_payload_bytes:
        raise InputError(413, f"payload of {len(data)} bytes exceeds the limit of {max_payload_bytes} bytes")
    return data


def is_urlencoded_form(body: bytes) -> bool:
    if not body or body.translate(None, _FORM_BYTES) or _BAD_ESCAPE.search(body):
        return False
    separators = body.translate(None, _NOT_SEPARATORS)  # one `=` in each field: `=&=&=`
    fields = separators.count(b"&") + 1
    if separators != b"=&" * (fields - 1) + b"=":
        return False
    return not body.startswith(b"=") and b"&=" not in body  # every name has a character


def _urlencoded_data(body: bytes) -> bytes | None:
    """The `data` field of a urlencoded form (its name written plainly, as forms and curl do)."""
    if not is_urlencoded_form(body):
        return None
    found: bytes | None = None
    for field in _DATA_FIELD.finditer(body):
        if field.start() > 0 and body[field.start() - 1] != ord("&"):
            continue  # the end of another name, like `metadata=`
        if found is not None:
            raise InputError(400, "form field 'data' is given more than once")
        found = unquote_to_bytes(field[1].replace(b"+", b" "))
    return found


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
    found: bytes | None = None
    try:
        for part in parser:
            if part.name != name:
                continue
            if found is not None:
                raise InputError(400, f"multipart field {name!r} is given more than once")
            found = part.raw
    except multipart.ParserLimitReached as exc:
        message = f"multipart body over a limit ({exc}); payloads may have {max_payload_bytes} bytes"
        raise InputError(413, message) from exc
    except multipart.MultipartError as exc:
        raise InputError(400, f"malformed multipart body: {exc}") from exc
    return found
