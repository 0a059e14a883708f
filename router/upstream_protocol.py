"""The upstream connections' protocol: aiohttp's, with an event stream's body decoded here.

aiohttp's client hands every HTTP chunk of a response through its parser, its payload reader's
chunk bookkeeping and (while router.pump relays the stream) the pump's reader hooks: half a
dozen Python calls per chunk. Warm, that is under a microsecond; but a streamed token usually
wakes the router on its own, and then what a chunk costs is the footprint of that path with
cold caches. Measured on one simulated replica, 256-token streams at 3 in flight (~300 chunks
a second, scenario 1's rate): a byte-for-byte proxy on the same loop 34-39 µs per chunk, this
router ~105 (bench/findings.md, issue 18 session 28).

For an event stream (status 200, ``text/event-stream``, chunked) this protocol lets aiohttp
parse the head only and decodes the chunked framing itself, one pass per read: the read's
data goes on in one call, straight to the stream's Pump when one relays it (its bytes written
to the client in the same turn), else to the payload reader as aiohttp would have fed it. The
last chunk (``0`` and the trailers) goes to aiohttp's parser, which ends the message exactly
as before, so the connection is kept or closed by aiohttp's rules. Any other response is
aiohttp's from its first byte to its last.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any, cast

import aiohttp
from aiohttp import ClientPayloadError
from aiohttp.client_proto import ResponseHandler

from vllm_fleet.router.pump import pump_of

#: A response head this protocol decodes the body of (aiohttp parses the head itself).
_EVENT_STREAM = re.compile(
    rb"\AHTTP/1\.1 200 (?=(?:.*\r\n)*?content-type:[ \t]*text/event-stream)"
    rb"(?=(?:.*\r\n)*?transfer-encoding:[ \t]*chunked[ \t]*\r\n)",
    re.IGNORECASE,
)
#: Longest response head buffered before aiohttp is given it as it is (it enforces its own
#: limits and errors).
MAX_HEAD_BYTES = 1 << 16
#: Longest chunk-size line (hex digits and extensions) accepted.
MAX_SIZE_LINE = 1 << 10
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
#: Where the fast path looks for the end of a size line (16 hex digits and CRLF).
_FAST_SIZE_LINE = 18

_PASS, _HEAD, _BODY = 0, 1, 2


class UpstreamProtocol(ResponseHandler):
    """aiohttp's ResponseHandler, decoding a chunked event stream's body itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._mode = _PASS
        #: Head bytes received so far (mode _HEAD), or the start of a size line (mode _BODY).
        self._partial = b""
        #: Bytes of the current chunk still to come, its closing CRLF included; 0 at a size line.
        self._left = 0

    def set_response_params(self, **params: Any) -> None:
        """A request is about to be sent on this connection: its answer starts with a head."""
        self._mode, self._partial, self._left = _HEAD, b"", 0
        super().set_response_params(**params)

    def data_received(self, data: bytes) -> None:
        mode = self._mode
        if mode == _BODY:
            if self._read_timeout or self._read_timeout_handle is not None:
                self._reschedule_timeout()  # sock_read, as aiohttp keeps it per read
            if not (self._left or self._partial):
                # The usual read of a stream: exactly one whole chunk, not the last. Decoded
                # in a few C calls; at scenario 1's rate each chunk wakes the router on its
                # own, and every Python line of the general loop costs a cold-cache microsecond.
                eol = data.find(b"\r\n", 0, _FAST_SIZE_LINE)
                if eol > 0 and _HEX.fullmatch(data, 0, eol) is not None:
                    end = eol + 2 + int(data[:eol], 16)
                    if end + 2 == len(data) and end > eol + 2 and data.endswith(b"\r\n"):
                        self._deliver(data[eol + 2 : end], last=False)
                        return
            self._body_received(data)
        elif mode == _PASS or not data:
            super().data_received(data)
        else:
            self._head_received(data)

    def _head_received(self, data: bytes) -> None:
        buffered = self._partial + data if self._partial else data
        end = buffered.find(b"\r\n\r\n")
        if end < 0 and len(buffered) <= MAX_HEAD_BYTES:
            self._partial = buffered
            return
        self._partial = b""
        self._mode = _PASS
        if end < 0:
            super().data_received(buffered)
            return
        cut = end + 4
        super().data_received(buffered[:cut])
        payload = self._payload
        if (
            payload is not None
            and not payload.is_eof()
            and payload.exception() is None
            and _EVENT_STREAM.match(buffered, 0, cut)
        ):
            self._mode = _BODY
            # what aiohttp's parser does at a first chunk: it ends the message with a chunk
            # of its own, which it may only do on a reader that was told chunks come
            payload.begin_http_chunk_receiving()
            if len(buffered) > cut:
                self._body_received(buffered[cut:])
        elif len(buffered) > cut:
            super().data_received(buffered[cut:])

    def _body_received(self, data: bytes) -> None:
        """Decode the chunks of one read; hand their data on in one piece."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        out: list[bytes] = []
        pos, size, left = 0, len(data), self._left
        while pos < size:
            if left:
                end = pos + left if pos + left < size else size
                crlf = pos + left - 2  # where this chunk's closing CRLF starts
                if crlf > pos:
                    out.append(data[pos : end if end < crlf else crlf])
                if end > crlf:
                    start = crlf if crlf > pos else pos
                    if data[start:end] != b"\r\n"[start - crlf : end - crlf]:
                        self._fail("a chunk not followed by CRLF")
                        return
                left -= end - pos
                pos = end
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if size - pos > MAX_SIZE_LINE:
                    self._fail("a chunk-size line too long")
                    return
                self._partial = data[pos:]
                break
            length = _chunk_size(data[pos:eol])
            if length is None:
                self._fail("a malformed chunk-size line")
                return
            if length == 0:  # the last chunk: aiohttp's parser ends the message
                self._left = 0
                self._mode = _PASS
                if out:
                    self._deliver(b"".join(out), last=True)
                super().data_received(data[pos:])
                return
            left = length + 2
            pos = eol + 2
        self._left = left
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out), last=False)

    def _deliver(self, data: bytes, *, last: bool) -> None:
        """One read's data: to the stream's pump when one relays it, else to the reader."""
        payload = self._payload
        if payload is None:
            return
        pump = pump_of(payload)
        if pump is None:
            payload.feed_data(data)
        elif last:
            pump.take(data)  # written with the stream's end, after the parser's eof
        else:
            pump.relay_now(data)

    def _fail(self, why: str) -> None:
        """A body that is not valid chunked framing: the read fails, the connection closes."""
        self._mode = _PASS
        self._should_close = True
        payload = self._payload
        if payload is not None:
            payload.set_exception(ClientPayloadError(f"the replica's stream is broken: {why}"))
        if self.transport is not None:
            self.transport.close()


def _chunk_size(line: bytes) -> int | None:
    """The size of a chunk-size line (extensions ignored), None when it is not one."""
    digits = line.split(b";", 1)[0].strip(b" \t")
    return int(digits, 16) if _HEX.fullmatch(digits) else None


class UpstreamConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector whose connections speak UpstreamProtocol."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        factory = functools.partial(UpstreamProtocol, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", factory)
