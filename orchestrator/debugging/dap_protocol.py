"""The Debug Adapter Protocol's wire format: framing, sequence numbers, bounded input.

A DAP message is a JSON object after a `Content-Length: N` header and a blank line
(https://microsoft.github.io/debug-adapter-protocol/overview, "Base protocol").

The contract:
- `read_message` returns one request as a dict, None at a clean end of the stream, or
  raises: `MalformedMessage` for a well-framed message that is not a JSON request
  object (the caller answers it with an error and reads on: the stream is still in
  step), `BrokenStream` when the framing itself cannot be trusted (a header past
  MAX_HEADER_BYTES, no or a bad Content-Length, a body past MAX_BODY_BYTES, a stream
  cut mid-message): the caller then closes the connection. Nothing a client sends
  raises anything else.
- `MessageWriter` numbers what the adapter sends (`seq` from 1) and writes each
  message whole: responses and events from concurrent tasks never interleave.
- The `argument`/`integer`/`text` helpers read request arguments with type and range
  checks, raising `RequestError` (answered as a failed response).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, TypeGuard

# One DAP message: far more than any request of a debug session needs.
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 4096
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
JSON_KINDS = {int: "an integer", str: "a string", bool: "true or false", list: "an array",
              dict: "an object"}  # fmt: skip


class BrokenStream(Exception):
    """The byte stream is out of step or over a bound: close the connection."""


class MalformedMessage(Exception):
    """A well-framed message that is not a request; `seq` is its seq when it had one."""

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


class RequestError(Exception):
    """A request that cannot be carried out: answered with success false and this text."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next request from `reader` (see the module docstring for what it raises)."""
    try:
        header = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise BrokenStream("the stream ended inside a message header") from None
    except asyncio.LimitOverrunError:
        raise BrokenStream(f"a message header is longer than {MAX_HEADER_BYTES} bytes") from None
    if len(header) > MAX_HEADER_BYTES:
        raise BrokenStream(f"a message header is longer than {MAX_HEADER_BYTES} bytes")
    length = _content_length(header)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise BrokenStream("the stream ended inside a message body") from None
    return _request(body)


def _content_length(header: bytes) -> int:
    length: int | None = None
    for line in header.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise BrokenStream("Content-Length is not a number") from None
    if length is None or length < 0:
        raise BrokenStream("a message without a valid Content-Length header")
    if length > MAX_BODY_BYTES:
        raise BrokenStream(f"a message of {length} bytes; at most {MAX_BODY_BYTES}")
    return length


def _request(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and bad UTF-8 alike
        raise MalformedMessage(f"the message is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessage("the message nests too deeply") from None
    if not isinstance(message, dict):
        raise MalformedMessage("a message must be a JSON object")
    seq = message.get("seq")
    if not (_is_int(seq) and 0 <= seq <= INT64_MAX):
        seq = 0
    if message.get("type") != "request" or not isinstance(message.get("command"), str):
        raise MalformedMessage("only requests are accepted (type 'request' with a command)", seq)
    arguments = message.get("arguments", {})
    if not isinstance(arguments, dict):
        raise MalformedMessage("arguments must be a JSON object", seq)
    message["seq"] = seq
    message["arguments"] = arguments
    return message


class MessageWriter:
    """Sends responses and events, numbered, each in one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._seq = 0

    def respond(
        self,
        request: dict[str, Any],
        body: dict[str, Any] | None = None,
        *,
        error: str | None = None,
    ) -> None:
        message: dict[str, Any] = {
            "type": "response",
            "request_seq": request.get("seq", 0),
            "command": request.get("command", ""),
            "success": error is None,
        }
        if error is not None:
            # `message` is shown by clients (VS Code puts it in the debug console);
            # `body.error` is the structured form the specification describes.
            message["message"] = error
            message["body"] = {"error": {"id": 1, "format": error, "showUser": True}}
        elif body is not None:
            message["body"] = body
        self._send(message)

    def event(self, name: str, body: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"type": "event", "event": name}
        if body is not None:
            message["body"] = body
        self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            return  # the client went away; what it no longer hears does not matter
        self._seq += 1
        data = json.dumps({"seq": self._seq, **message}, separators=(",", ":")).encode()
        self._writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(data), data))

    async def drain(self) -> None:
        # A client gone is seen by the reader, which ends the session.
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def argument(arguments: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """`arguments[name]` when it is a `kind` (or absent: `default`); else RequestError."""
    value = arguments.get(name, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"'{name}' must be {JSON_KINDS[kind]}")
    return value


def integer(
    arguments: dict[str, Any], name: str, default: int | None = None, *, high: int = INT32_MAX
) -> int:
    """A non-negative integer argument no larger than `high`; required without `default`."""
    value = argument(arguments, name, int, default)
    if value is None:
        raise RequestError(f"'{name}' is required")
    if not 0 <= value <= high:
        raise RequestError(f"'{name}' must be between 0 and {high}")
    return int(value)


def text(arguments: dict[str, Any], name: str, *, limit: int = 64 * 1024) -> str:
    """A required string argument of at most `limit` characters."""
    value = argument(arguments, name, str)
    if value is None:
        raise RequestError(f"'{name}' is required")
    if len(value) > limit:
        raise RequestError(f"'{name}' is longer than {limit} characters")
    return str(value)
