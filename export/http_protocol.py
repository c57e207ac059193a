"""uvicorn's HTTP/1.1 protocol for ``fastvae serve``: a bounded request head, JSON refusals.

uvicorn's httptools parser (its fastest, picked by ``http="auto"``) keeps a header's bytes
until the header ends, with no limit: one connection sending a 200 MB header held ~285 MB of
the service's memory and still got its 200. ``protocol_settings()`` picks that parser with the
head bounded by ``MAX_HEAD_BYTES``: a longer head gets one JSON 431 and the connection is
closed. At uvicorn's ``limit_concurrency`` (``--max-connections``) it answers a JSON 503 with
``Retry-After``, as the service's other refusals, where uvicorn's own is plain text. Without
httptools, uvicorn's h11 parser takes the same head bound (``h11_max_incomplete_event_size``)
and answers both in plain text.
"""

from __future__ import annotations

import json

# nginx's default room for a request's headers is 4 x 8 KiB; h11's own default is 16 KiB
MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 1.0  # how long a refused connection's further bytes are read and dropped


async def _at_connection_limit(scope, receive, send) -> None:
    """The ASGI answer to a request over ``--max-connections``: uvicorn's, in JSON."""
    body = json.dumps({"error": "the service is at its limit of open connections and requests in progress "
                                "(--max-connections): retry later"}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def protocol_settings() -> dict:
    """uvicorn.Config keywords choosing the HTTP/1.1 protocol with the bounded head (and, with
    httptools, the JSON 503 at the connection limit)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: h11, which bounds an incomplete head itself
        return {"http": "h11", "h11_max_incomplete_event_size": MAX_HEAD_BYTES}

    class BoundedHeadProtocol(HttpToolsProtocol):
        """httptools, refusing a request head over MAX_HEAD_BYTES. The bytes of every read in
        which parsing made no progress (no headers completed, no body bytes, no request ended)
        count towards it: a head, or a chunked body's trailer section, which httptools holds as
        headers too. So what is held is at most the bound plus one read (asyncio reads 256 KiB
        at most)."""

        _progress = False  # the read being parsed completed headers, carried body bytes or ended a request
        _head_bytes = 0
        _refused = False  # answered 431: further bytes are dropped until the close

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn's check, made here (on_headers_complete), with the JSON answer
            self._limit, self.limit_concurrency = self.limit_concurrency, None

        def on_headers_complete(self) -> None:
            self._progress = True
            limit = self._limit
            if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
                super().on_headers_complete()
                return
            self.logger.warning("Exceeded concurrency limit.")
            app, self.app = self.app, _at_connection_limit  # the app this request's cycle runs
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def on_body(self, body: bytes) -> None:
            self._progress = True
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._progress = True
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._progress = False
            super().data_received(data)
            if self.transport.is_closing():
                return
            # a read with progress may end with the start of a head: undercounted by less than
            # one read, never counting another request's bytes
            self._head_bytes = 0 if self._progress else self._head_bytes + len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse()

        def eof_received(self) -> None:
            if self._refused:  # the client has read the answer, or stopped sending
                self.transport.close()
                return
            super().eof_received()

        def _refuse(self) -> None:
            """One JSON 431, then a lingering close: the rest of the head is read and dropped
            for LINGER_S, so the client reads the answer (closing with its bytes unread would
            reset the connection, and the reset can discard the answer in the client's kernel)."""
            body = json.dumps({"error": f"request line and headers over {MAX_HEAD_BYTES // 1024} KiB: "
                                        "send large values in the body"}).encode()
            head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
            if self.cycle is not None and not self.cycle.response_complete:  # a request in progress on
                self.transport.close()  # this connection (trailers, pipelining) writes there: no room for ours
                return
            self._refused = True
            self.transport.write(b"".join(head) + body)
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return {"http": BoundedHeadProtocol}
