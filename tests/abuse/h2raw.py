"""A hand-made gRPC client over HTTP/2 (the ``h2`` package) for the abuse tests.

It sends exactly the bytes a test asks for: any 5-byte prefix, any body, no body at all,
HEADERS followed by RST_STREAM. Every read is bounded in time.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import anyio
import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes

WORKER = "/jobworker.v1.Worker/"


def frame(body: bytes, *, flag: int = 0, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message: flag byte, 4-byte big-endian length, body."""
    size = len(body) if length is None else length
    return bytes([flag]) + size.to_bytes(4, "big") + body


@dataclass
class Reply:
    """What came back on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    reset: int | None = None

    @property
    def status(self) -> int | None:
        value = self.headers.get("grpc-status")
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        return self.headers.get("grpc-message", "")


class RawH2:
    """One HTTP/2 connection over TLS to the server, driven by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.replies: dict[int, Reply] = {}
        self.ended: set[int] = set()
        self.goaway: int | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> RawH2:
        with anyio.fail_after(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
        client = cls(reader, writer)
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            await self.writer.drain()

    def headers(self, path: str) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc+proto"),
            ("te", "trailers"),
        ]

    async def start(self, path: str, *, end: bool = False) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, self.headers(path), end_stream=end)
        self.replies[stream_id] = Reply()
        await self.flush()
        return stream_id

    async def send(self, stream_id: int, data: bytes, *, end: bool = True) -> None:
        """Send ``data`` on the stream as far as flow control allows, then END_STREAM."""
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                await self.receive_once(5)
                if stream_id in self.ended or self.closed:
                    return
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            await self.flush()
        if end:
            self.conn.end_stream(stream_id)
            await self.flush()

    async def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        await self.flush()

    async def receive_once(self, seconds: float) -> None:
        with anyio.fail_after(seconds):
            data = await self.reader.read(65536)
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        for event in events:
            self._handle(event)
        await self.flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            reply = self.replies.setdefault(event.stream_id, Reply())
            reply.headers.update(dict(event.headers))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            self.replies.setdefault(event.stream_id, Reply()).data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.replies.setdefault(event.stream_id, Reply()).reset = event.error_code
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event.error_code
            self.closed = True

    async def wait(self, stream_id: int, seconds: float = 10) -> Reply:
        """Read until ``stream_id`` ends (or the connection does); its reply."""
        with anyio.fail_after(seconds):
            while stream_id not in self.ended and not self.closed:
                await self.receive_once(seconds)
        return self.replies[stream_id]

    async def call(self, path: str, data: bytes | None, seconds: float = 10) -> Reply:
        """One call: HEADERS, then ``data`` with END_STREAM (or END_STREAM on the HEADERS)."""
        stream_id = await self.start(path, end=data is None)
        if data is not None:
            await self.send(stream_id, data)
        return await self.wait(stream_id, seconds)

    async def aclose(self) -> None:
        self.writer.close()
        try:
            with anyio.move_on_after(2):
                await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
