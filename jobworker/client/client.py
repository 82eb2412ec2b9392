"""The async client: typed calls to a jobworker server over mutual TLS.

::

    async with Client("127.0.0.1", 50051, cert="admin.pem", key="admin-key.pem",
                      ca="server-ca.pem") as client:
        status = await client.start("ls", ["-l"])
        async with client.output(status.id) as output:
            async for data in output:
                sys.stdout.buffer.write(data)
        print((await client.status(status.id)).exit_code)

Every failure is a :class:`~jobworker.errors.JobworkerError`: the server's gRPC statuses map
back to the library's exception tree, and a server that cannot be reached is
:class:`~jobworker.errors.Unavailable`.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from types import TracebackType
from typing import TypeVar

from grpclib.client import Channel, Stream
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.exceptions import StreamClosedError

from jobworker._proto.jobworker import v1 as pb
from jobworker._proto_convert import (
    chunk_from_proto,
    spec_to_proto,
    status_from_proto,
)
from jobworker.client.channel import open_channel
from jobworker.client.tls import client_ssl_context
from jobworker.errors import JobworkerError, Unavailable, error_from_status
from jobworker.models import JobSpec, JobStatus, Limits, Network, OutputChunk

__all__ = ["Client", "OutputReader"]

T = TypeVar("T")
StrPath = str | os.PathLike[str]

_STREAM_PATH = "/jobworker.v1.Worker/StreamJobOutput"


class Client:
    """A connection to one jobworker server. Use it as an async context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert: StrPath,
        key: StrPath,
        ca: StrPath,
        timeout: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = client_ssl_context(cert, key, ca)
        self._timeout = timeout
        self._channel: Channel | None = None
        self._stub: pb.WorkerStub | None = None

    async def __aenter__(self) -> Client:
        self._channel = open_channel(self.host, self.port, self._ssl)
        self._stub = pb.WorkerStub(self._channel, timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None

    @property
    def stub(self) -> pb.WorkerStub:
        if self._stub is None:
            raise RuntimeError("use the client inside 'async with'")
        return self._stub

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with translate_errors(self.host, self.port):
            yield

    async def _call(self, call: Awaitable[T]) -> T:
        with self._errors():
            return await call

    async def start(
        self,
        program: str,
        args: Iterable[str] = (),
        limits: Limits | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        network: Network | None = None,
    ) -> JobStatus:
        """Start ``program`` with ``args``; the job's id is ``status.id``.

        ``env`` adds environment variables, ``cwd`` is the directory to start in (default:
        the job's own), ``user`` a host account to run as (admins only, and only accounts
        the server allows), ``network`` the network it sees (default: the server's).
        """
        spec = JobSpec(
            program,
            tuple(args),
            limits or Limits(),
            env=dict(env or {}),
            cwd=cwd,
            user=user,
            network=network,
        )
        request = spec_to_proto(spec)
        response = await self._call(self.stub.start_job(request))
        return _status(response.status)

    async def stop(self, job_id: str) -> JobStatus:
        """Stop a job; returns its final status once all its processes are gone."""
        response = await self._call(self.stub.stop_job(pb.StopJobRequest(job_id=job_id)))
        return _status(response.status)

    async def status(self, job_id: str) -> JobStatus:
        response = await self._call(self.stub.get_job_status(pb.GetJobStatusRequest(job_id=job_id)))
        return _status(response.status)

    async def list(self) -> list[JobStatus]:
        """Every job the caller may see, oldest first."""
        response = await self._call(self.stub.list_jobs(pb.ListJobsRequest()))
        return [status_from_proto(s) for s in response.jobs]

    def output(self, job_id: str, offset: int = 0) -> OutputReader:
        """A job's output from ``offset``, live until the job ends (see :class:`OutputReader`)."""
        if self._channel is None:
            raise RuntimeError("use the client inside 'async with'")
        return OutputReader(self, self._channel, job_id, offset)


class OutputReader:
    """An async iterator of output bytes; leaving ``async with`` ends the call at once.

    ``offset`` is where the next chunk starts, so a reader that lost its connection can
    resume with ``client.output(job_id, reader.offset)``.
    """

    def __init__(self, client: Client, channel: Channel, job_id: str, offset: int) -> None:
        self._client = client
        self._channel = channel
        self._request = pb.StreamJobOutputRequest(job_id=job_id, offset=offset)
        self.offset = offset
        self._stack = AsyncExitStack()
        self._stream: Stream[pb.StreamJobOutputRequest, pb.OutputChunk] | None = None
        self._finished = False

    async def __aenter__(self) -> OutputReader:
        with self._client._errors():
            stream = await self._stack.enter_async_context(
                self._channel.request(
                    _STREAM_PATH,
                    Cardinality.UNARY_STREAM,
                    pb.StreamJobOutputRequest,
                    pb.OutputChunk,
                    timeout=None,
                )
            )
            await stream.send_message(self._request, end=True)
        self._stream = stream
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and not self._finished:
            # Left before the end: end the call now, do not drain it. The server may have
            # ended it already (an error nobody read yet); then there is nothing to cancel.
            with contextlib.suppress(StreamClosedError):
                await stream.cancel()
        try:
            with self._client._errors():
                await self._stack.aclose()  # raises the status of a call the server failed
        except JobworkerError:
            if exc is None:
                raise
            # else the body's own exception is the one to see

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk.data

    async def next_chunk(self) -> OutputChunk | None:
        """The next chunk with its offset, or None once the job ended and all was read."""
        if self._stream is None:
            return None
        try:
            with self._client._errors():
                message = await self._stream.recv_message()
                if message is None:
                    await self._stream.recv_trailing_metadata()
                    self._finished = True
                    return None
        except JobworkerError:
            self._finished = True  # the server ended the call with an error status
            raise
        chunk = chunk_from_proto(message)
        if chunk.offset != self.offset:
            raise JobworkerError(
                f"output out of order: got offset {chunk.offset}, expected {self.offset}"
            )
        self.offset += len(chunk.data)
        return chunk


def _status(message: pb.JobStatus | None) -> JobStatus:
    if message is None:
        raise JobworkerError("the server sent a response without a job status")
    return status_from_proto(message)


@contextmanager
def translate_errors(host: str, port: int) -> Iterator[None]:
    """Raise every failure of a call as a :class:`JobworkerError`."""
    try:
        yield
    except GRPCError as exc:
        raise error_from_status(exc.status, exc.message) from None
    except ssl.SSLError as exc:
        raise Unavailable(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}") from None
    except StreamTerminatedError as exc:
        raise Unavailable(
            f"the connection to {host}:{port} was closed ({exc}); if this happens on every "
            "call, the server may not accept this client certificate"
        ) from None
    except (ConnectionError, OSError) as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise Unavailable(f"cannot reach the jobworker server at {host}:{port}: {reason}") from None
