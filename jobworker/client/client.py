"""The async client: typed calls to a jobworker server over mutual TLS (asyncio only).

::

    async with Client("127.0.0.1:50051", cert="admin.pem", key="admin-key.pem",
                      ca="server-ca.pem") as client:
        status = await client.start("ls", ["-l"])
        async with client.output(status.id) as output:
            async for data in output:
                sys.stdout.buffer.write(data)
        print((await client.wait(status.id)).exit_code)

Every failure is a :class:`~jobworker.errors.JobworkerError`: the server's errors arrive as
the very class the server raised, a server that cannot be reached is
:class:`~jobworker.errors.Unavailable` (:class:`~jobworker.errors.TlsError` when the
handshake fails) and a call that outlives its deadline is
:class:`~jobworker.errors.DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

from grpclib.client import Channel, Stream
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.exceptions import StreamClosedError

from jobworker._proto.jobworker import v1 as pb
from jobworker._proto_convert import spec_to_proto, status_from_proto
from jobworker.client.channel import open_channel
from jobworker.client.config import (
    DEFAULT_RECONNECT_FOR,
    DEFAULT_SERVER,
    DEFAULT_STOP_GRACE,
    DEFAULT_TIMEOUT,
    ClientFiles,
    parse_target,
    parse_timeout,
)
from jobworker.client.tls import client_ssl_context
from jobworker.errors import (
    ERROR_DOMAIN,
    DeadlineExceeded,
    InvalidOffset,
    JobworkerError,
    TlsError,
    Unavailable,
    error_from_status,
)
from jobworker.models import JobSpec, JobStatus, Limits, Network, OutputChunk

__all__ = ["Client", "OutputReader"]

T = TypeVar("T")
StrPath = str | os.PathLike[str]

_STREAM_PATH = "/jobworker.v1.Worker/StreamJobOutput"


# Past any output a job can have: a stream from here ends, without a chunk, when the job does.
_PAST_ANY_OUTPUT: Final = 1 << 62
_RETRY_FIRST, _RETRY_MOST = 0.05, 1.0


class _Default(enum.Enum):
    TIMEOUT = "the client's timeout"


_CLIENT_TIMEOUT: Final = _Default.TIMEOUT
Timeout = float | None | _Default


class Client:
    """A connection to one jobworker server. Use it as an async context manager.

    ``server`` is ``HOST:PORT``, ``HOST`` (port 50051) or ``[IPv6]:PORT``; a ``port`` given
    separately goes with a bare host. ``cert``, ``key`` and ``ca`` default to the ``admin``
    files of the PKI that ``jobworker serve`` creates on this host (see :meth:`from_env` for
    the environment). ``timeout`` is how long a call may take to answer (``None``: no
    limit); a stop may take ``stop_grace`` seconds more, a stream's limit covers connecting
    and sending its request. An output stream whose server goes away reconnects for up to
    ``reconnect_for`` seconds (0: never).

    The client runs on asyncio only (grpclib's event loop); under trio it fails at once.
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        port: int | None = None,
        *,
        cert: StrPath | None = None,
        key: StrPath | None = None,
        ca: StrPath | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        stop_grace: float = DEFAULT_STOP_GRACE,
        reconnect_for: float = DEFAULT_RECONNECT_FOR,
    ) -> None:
        if port is None:
            self.host, self.port = parse_target(server)
        else:
            self.host, self.port = server.removeprefix("[").removesuffix("]"), port
        self.files = ClientFiles.resolve(cert, key, ca, env={})
        self._ssl = client_ssl_context(self.files.cert, self.files.key, self.files.ca)
        self.timeout = timeout
        self.stop_grace = stop_grace
        self.reconnect_for = reconnect_for
        self._channel: Channel | None = None
        self._stub: pb.WorkerStub | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Client:
        """A client configured as the ``jobworker`` command is: ``JOBWORKER_SERVER``,
        ``JOBWORKER_CERT``, ``JOBWORKER_KEY``, ``JOBWORKER_CA`` and ``JOBWORKER_TIMEOUT``
        (seconds, 0 for none), each defaulting as in :class:`Client`. Keyword arguments
        override them."""
        env = os.environ if env is None else env
        files = ClientFiles.resolve(
            overrides.pop("cert", None), overrides.pop("key", None), overrides.pop("ca", None), env
        )
        settings: dict[str, Any] = {"cert": files.cert, "key": files.key, "ca": files.ca}
        if env.get("JOBWORKER_TIMEOUT"):
            settings["timeout"] = parse_timeout(env["JOBWORKER_TIMEOUT"])
        settings.update(overrides)
        return cls(env.get("JOBWORKER_SERVER") or DEFAULT_SERVER, **settings)

    @property
    def target(self) -> str:
        """``HOST:PORT`` of the server, as an address is written (``[::1]:50051``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def __aenter__(self) -> Client:
        self._channel = open_channel(self.host, self.port, self._ssl)
        self._stub = pb.WorkerStub(self._channel)
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
            raise RuntimeError("use the client inside 'async with Client(...) as client'")
        return self._stub

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise RuntimeError("use the client inside 'async with Client(...) as client'")
        return self._channel

    def _seconds(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _Default) else timeout

    @contextmanager
    def errors(self, timeout: float | None = None) -> Iterator[None]:
        """Raise every failure of a call as a :class:`JobworkerError` (see :func:`translate`)."""
        try:
            yield
        except (GRPCError, OSError, StreamTerminatedError) as exc:
            raise translate(exc, self, timeout) from None

    async def _call(self, call: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
        with self.errors(timeout):
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
        max_output: int | None = None,
        timeout: Timeout = _CLIENT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline
    ) -> JobStatus:
        """Start ``program`` with ``args``; the job's id is ``status.id``.

        ``env`` adds environment variables, ``cwd`` is the directory to start in (default:
        the job's own), ``user`` a host account to run as (admins only, and only accounts
        the server allows), ``network`` the network it sees (default: the server's),
        ``max_output`` the most bytes of output the server keeps (default: the server's):
        past it, the head and the tail are kept and the middle dropped.
        """
        spec = JobSpec(
            program,
            tuple(args),
            limits or Limits(),
            env=dict(env or {}),
            cwd=cwd,
            user=user,
            network=network,
            max_output=max_output,
        )
        seconds = self._seconds(timeout)
        call = self.stub.start_job(spec_to_proto(spec), timeout=seconds)
        return _status((await self._call(call, seconds)).status)

    async def stop(
        self,
        job_id: str,
        *,
        timeout: Timeout = _CLIENT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline
    ) -> JobStatus:
        """Stop a job; returns its final status once all its processes are gone.

        The call's deadline is ``timeout`` plus the client's ``stop_grace``, so that a
        server waiting out its grace period before SIGKILL is not cut off.
        """
        seconds = self._seconds(timeout)
        if seconds is not None:
            seconds += self.stop_grace
        call = self.stub.stop_job(pb.StopJobRequest(job_id=job_id), timeout=seconds)
        return _status((await self._call(call, seconds)).status)

    async def remove(
        self,
        job_id: str,
        *,
        timeout: Timeout = _CLIENT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline
    ) -> JobStatus:
        """Remove an ended job (record, output, working directory); returns its final status.
        A running job raises :class:`FailedPrecondition`."""
        seconds = self._seconds(timeout)
        call = self.stub.remove_job(pb.RemoveJobRequest(job_id=job_id), timeout=seconds)
        return _status((await self._call(call, seconds)).status)

    async def prune(
        self,
        older_than: float | None = None,
        *,
        timeout: Timeout = _CLIENT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline
    ) -> list[str]:
        """Remove the ended jobs the caller may see that ended at least ``older_than``
        seconds ago (``None``: all of them); returns their ids, oldest first."""
        seconds = self._seconds(timeout)
        request = pb.PruneJobsRequest(older_than_seconds=older_than)
        response = await self._call(self.stub.prune_jobs(request, timeout=seconds), seconds)
        return list(response.job_ids)

    async def status(
        self,
        job_id: str,
        *,
        timeout: Timeout = _CLIENT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline
    ) -> JobStatus:
        seconds = self._seconds(timeout)
        request = pb.GetJobStatusRequest(job_id=job_id)
        response = await self._call(self.stub.get_job_status(request, timeout=seconds), seconds)
        return _status(response.status)

    async def list(self, *, timeout: Timeout = _CLIENT_TIMEOUT) -> list[JobStatus]:  # noqa: ASYNC109
        """Every job the caller may see, oldest first."""
        seconds = self._seconds(timeout)
        response = await self._call(
            self.stub.list_jobs(pb.ListJobsRequest(), timeout=seconds), seconds
        )
        return [status_from_proto(s) for s in response.jobs]

    def output(
        self,
        job_id: str,
        offset: int = 0,
        *,
        reconnect_for: float | None = None,
        timestamps: bool = False,
    ) -> OutputReader:
        """A job's output from ``offset``, live until the job ends (see :class:`OutputReader`).

        Use it as ``async with client.output(job_id) as output: async for data in output``.
        With ``timestamps``, each chunk from :meth:`OutputReader.next_chunk` says when it was
        written (``OutputChunk.written_at``).
        """
        self.channel  # noqa: B018 - fail here, outside 'async with', not later
        again = self.reconnect_for if reconnect_for is None else reconnect_for
        return OutputReader(self, job_id, offset, again, timestamps=timestamps)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - waits out the job, not one call
    ) -> JobStatus:
        """Wait until the job has ended and return its final status.

        It follows the job's end on one stream (no polling, no output transferred), which
        reconnects as :meth:`output` does. After ``timeout`` seconds (``None``: no limit) it
        raises :class:`DeadlineExceeded`; the job is not affected.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    status = await self.status(job_id)
                    if status.state.is_final:
                        return status
                    with contextlib.suppress(InvalidOffset):  # it ended in between
                        async with self.output(job_id, _PAST_ANY_OUTPUT) as ending:
                            while await ending.next_chunk() is not None:
                                pass
        except TimeoutError:
            raise DeadlineExceeded(f"job {job_id} was still running after {timeout:g} s") from None


class OutputReader:
    """An async iterator of output bytes; leaving ``async with`` ends the call at once.

    ``offset`` is where the next chunk starts. When the connection is lost or the server
    goes away (UNAVAILABLE), the reader opens the stream again from ``offset``, so no byte
    is lost or repeated, for up to ``reconnect_for`` seconds; then it raises
    :class:`Unavailable` saying so.

    Where the server dropped part of the output (the job's output cap), :meth:`next_chunk`
    returns a gap: an :class:`OutputChunk` with ``dropped`` set and no data. Iterating
    over the bytes skips gaps, and every gap seen is in :attr:`gaps` as ``(start, end)``.
    """

    def __init__(
        self,
        client: Client,
        job_id: str,
        offset: int,
        reconnect_for: float,
        *,
        timestamps: bool = False,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self.offset = offset
        self.reconnect_for = reconnect_for
        self.timestamps = timestamps
        self.reconnects = 0
        self.gaps: list[tuple[int, int]] = []
        self._stack = AsyncExitStack()
        self._stream: Stream[pb.StreamJobOutputRequest, OutputChunk] | None = None
        self._entered = False
        self._finished = False
        self._lost_at: float | None = None
        self._lost: JobworkerError | None = None

    async def __aenter__(self) -> OutputReader:
        self._entered = True
        try:
            await self._open()
        except Exception:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._close()
        except JobworkerError:
            if exc is None:
                raise
            # else the body's own exception is the one to see
        finally:
            self._entered = False

    async def _open(self) -> None:
        """Open the stream from ``offset``; the client's timeout bounds connect and send."""
        seconds = self._client.timeout
        request = pb.StreamJobOutputRequest(
            job_id=self.job_id, offset=self.offset, timestamps=self.timestamps
        )
        with self._client.errors(seconds):
            async with asyncio.timeout(seconds):
                stream = await self._stack.enter_async_context(
                    self._client.channel.request(
                        _STREAM_PATH,
                        Cardinality.UNARY_STREAM,
                        pb.StreamJobOutputRequest,
                        OutputChunk,  # decoded by hand (client/channel.py)
                        timeout=None,
                    )
                )
                await stream.send_message(request, end=True)
        self._stream = stream

    async def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and not self._finished:
            # Left before the end: end the call now, do not drain it. The server may have
            # ended it already (an error nobody read yet), or the connection is gone; then
            # there is nothing to cancel.
            with contextlib.suppress(StreamClosedError, StreamTerminatedError, OSError):
                await stream.cancel()
        stack, self._stack = self._stack, AsyncExitStack()
        with self._client.errors():
            await stack.aclose()  # raises the status of a call the server failed

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while (chunk := await self.next_chunk()) is not None:
            if chunk.data:
                return chunk.data
        raise StopAsyncIteration

    async def next_chunk(self) -> OutputChunk | None:
        """The next chunk with its offset (or the next gap), or None once the job ended and
        all was read."""
        if not self._entered:
            raise RuntimeError(
                "read the output inside 'async with client.output(job_id) as output:'"
            )
        while not self._finished:
            try:
                message = await self._receive()
            except Unavailable as exc:
                if isinstance(exc, TlsError):
                    raise
                await self._reconnect(exc)
                continue
            if message is None:
                self._finished = True
                return None
            self._lost_at = None
            chunk = message
            if chunk.offset != self.offset:
                raise JobworkerError(
                    f"output out of order: got offset {chunk.offset}, expected {self.offset}"
                )
            self.offset = chunk.end
            if chunk.dropped:
                self.gaps.append((chunk.offset, chunk.end))
            return chunk
        return None

    async def _receive(self) -> OutputChunk | None:
        if self._stream is None:
            raise self._lost or Unavailable("the output stream is closed")
        try:
            with self._client.errors():
                message = await self._stream.recv_message()
                if message is None:
                    await self._stream.recv_trailing_metadata()
                return message
        except Unavailable:
            raise
        except JobworkerError:
            self._finished = True  # the server ended the call with an error status
            raise

    async def _reconnect(self, lost: Unavailable) -> None:
        """Open the stream again from ``offset``, retrying until ``reconnect_for`` is over."""
        now = time.monotonic()
        self._lost_at = self._lost_at or now
        self._lost = lost
        with contextlib.suppress(JobworkerError):
            await self._close()
        delay = _RETRY_FIRST
        while True:
            if time.monotonic() - self._lost_at >= self.reconnect_for:
                self._finished = True
                raise Unavailable(
                    f"lost the output of job {self.job_id} at byte {self.offset} and could not "
                    f"reconnect to {self._client.target} within {self.reconnect_for:g} s: "
                    f"{self._lost.message}"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MOST)
            try:
                await self._open()
            except (Unavailable, DeadlineExceeded) as exc:
                if isinstance(exc, TlsError):
                    raise
                self._lost = exc
                with contextlib.suppress(JobworkerError):
                    await self._close()
                continue
            self.reconnects += 1
            return


def _status(message: pb.JobStatus | None) -> JobStatus:
    if message is None:
        raise JobworkerError("the server sent a response without a job status")
    return status_from_proto(message)


def _error_class_name(details: Sequence[Any] | None) -> str | None:
    """The class name in the ``google.rpc.ErrorInfo`` of jobworker's domain, if any."""
    for detail in details or ():
        if getattr(detail, "domain", None) == ERROR_DOMAIN:
            reason = getattr(detail, "reason", None)
            return reason if isinstance(reason, str) else None
    return None


# OpenSSL alerts with which a server refuses the client's certificate.
_REFUSED_ALERTS: Final = (
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_DECRYPT_ERROR",
)
_HOSTNAME_MISMATCH: Final = 62  # X509_V_ERR_HOSTNAME_MISMATCH


def _tls_error(exc: ssl.SSLError, client: Client) -> JobworkerError:
    target, files = client.target, client.files
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == _HOSTNAME_MISMATCH:
            return TlsError(
                f"the server certificate of {target} is not issued for the name "
                f"{client.host!r}: connect by a name it was issued for (the server's PKI "
                "lists them; `jobworker certs init --host NAME` adds one)"
            )
        return TlsError(
            f"the server certificate of {target} is not trusted: {exc.verify_message}; "
            f"is {files.ca} the server CA of that server's PKI?"
        )
    reason = exc.reason or str(exc)
    if any(reason.endswith(alert) for alert in _REFUSED_ALERTS):
        return TlsError(
            f"the server at {target} refused the client certificate {files.cert} ({reason}): "
            "use a certificate issued by that server's client CA"
        )
    return TlsError(f"TLS handshake with {target} failed: {reason}")


def translate(
    exc: GRPCError | OSError | StreamTerminatedError, client: Client, timeout: float | None = None
) -> JobworkerError:
    """The :class:`JobworkerError` for a failed call of ``client`` (the one mapping back)."""
    target = client.target
    if isinstance(exc, GRPCError):
        return error_from_status(exc.status, exc.message, _error_class_name(exc.details))
    if isinstance(exc, ssl.SSLError):
        return _tls_error(exc, client)
    if isinstance(exc, TimeoutError):
        within = "" if timeout is None else f" within {timeout:g} s"
        return DeadlineExceeded(
            f"no answer from the jobworker server at {target}{within}; the call may still "
            "be carried out (give a longer --timeout / timeout=)"
        )
    if isinstance(exc, StreamTerminatedError | ConnectionResetError):
        return Unavailable(
            f"the connection to {target} was lost ({exc}); if every call ends so, the server "
            f"does not accept the client certificate {client.files.cert}"
        )
    reason = exc.strerror or str(exc) or type(exc).__name__
    return Unavailable(f"cannot reach the jobworker server at {target}: {reason}")
