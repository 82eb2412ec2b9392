"""The grpcio peer: jobworker's StartJob and StreamJobOutput on grpcio's C core (``grpc.aio``).

``python -m bench.grpcio_peer --cert ... --key ... --client-ca ... --logs DIR --chunk-size N``
listens on 127.0.0.1, prints its port, and serves until its standard input closes (so it
never outlives the benchmark), then kills any job still running. It is a bench-only program:
jobworker itself never imports grpc.

What it serves, on the same wire as jobworker (``/jobworker.v1.Worker/...``), so that the
jobworker client library talks to it exactly as to jobworker:

- **StreamJobOutput**: the log file ``DIR/<job_id>.log`` from the request's offset, in
  chunks of the given size (``os.pread``; jobworker's default size unless told otherwise),
  one OutputChunk each. A job of this peer that is still running is followed live: an
  inotify watch (asyncinotify) on the file and the job's end both wake the stream, which
  reads to the end of the file after each wake-up and ends once the job has ended and
  everything is sent, as jobworker's reader does. Any other file (the bench links
  jobworker's finished log here) is sent to its end.
- **StartJob**: creates the job's log file, starts the program with
  ``asyncio.create_subprocess_exec`` (stdin ``/dev/null``, stdout and stderr into the log,
  as jobworker's jobs write), and answers once it has been started, which for
  ``subprocess`` means exec'd: jobworker's StartJob also answers once the program was
  exec'd. The peer then awaits the process's end (a pidfd) to end its followers. It does
  none of the confinement (no cgroup, uid, namespaces; bench/isolation.py measures those),
  no validation and no records: the start row compares jobworker's whole StartJob with the
  least a gRPC service must do to start a process whose output it can serve.

Messages are parsed and encoded by hand (identity serializers, field numbers from
protos/jobworker/v1/worker.proto), so no generated code and no protobuf runtime is on the
peer's path. TLS: the same server certificate, key and client CA as jobworker, a client
certificate required; grpcio's C core offers TLS 1.2 and 1.3 and has no Python setting for
the minimum, but the jobworker client speaks only TLS 1.3, so every connection is TLS 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from asyncinotify import Inotify, Mask

from bench.stdin import stdin_closed

_SERVICE = "jobworker.v1.Worker"
_RUNNING = 1  # JobState.JOB_STATE_RUNNING


# Protocol buffers, by hand: only what these messages use.


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: an int for VARINT, bytes for LEN; others skipped."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # VARINT
            value, pos = _read_varint(data, pos)
            yield number, value
        elif wire_type == 2:  # LEN
            size, pos = _read_varint(data, pos)
            yield number, data[pos : pos + size]
            pos += size
        elif wire_type == 1:  # I64
            pos += 8
        elif wire_type == 5:  # I32
            pos += 4
        else:
            raise ValueError(f"wire type {wire_type} is not supported")


def _len_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _output_chunk(offset: int, data: bytes) -> bytes:
    """OutputChunk{offset = 1, data = 2}."""
    return b"".join((b"\x08", _varint(offset), b"\x12", _varint(len(data)), data))


def _start_response(job_id: str, program: str, args: list[str], pid: int) -> bytes:
    """StartJobResponse{status = 1: JobStatus{id = 1, state = 2, program = 4, args = 5,
    pid = 6, started_at = 10: Timestamp{seconds = 1, nanos = 2}}}."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    status = b"".join(
        (
            _len_field(1, job_id.encode()),
            _varint_field(2, _RUNNING),
            _len_field(4, program.encode()),
            *(_len_field(5, arg.encode()) for arg in args),
            _varint_field(6, pid),
            _len_field(10, _varint_field(1, seconds) + _varint_field(2, nanos)),
        )
    )
    return _len_field(1, status)


# The service.


@dataclass
class _Job:
    process: asyncio.subprocess.Process
    ended: bool = False
    waiters: set[asyncio.Event] = field(default_factory=set)


class Peer:
    def __init__(self, logs: Path, chunk_size: int) -> None:
        self.logs = logs
        self.chunk_size = chunk_size
        self.jobs: dict[str, _Job] = {}
        self._reapers: set[asyncio.Task[None]] = set()

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: requests arrive as bytes and responses leave as bytes.
        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "StartJob": grpc.unary_unary_rpc_method_handler(self.start_job),
                "StreamJobOutput": grpc.unary_stream_rpc_method_handler(self.stream_job_output),
            },
        )

    async def start_job(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        program, args = "", []
        for number, value in _fields(request):
            if number == 1 and isinstance(value, bytes):
                program = value.decode()
            elif number == 2 and isinstance(value, bytes):
                args.append(value.decode())
        job_id = str(uuid.uuid4())
        fd = os.open(
            self.logs / f"{job_id}.log",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
            0o640,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                program, *args, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd
            )
        except OSError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot start {program}: {exc}")
        finally:
            os.close(fd)
        job = self.jobs[job_id] = _Job(process)
        reaper = asyncio.create_task(self._reap(job))
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        return _start_response(job_id, program, args, process.pid)

    async def _reap(self, job: _Job) -> None:
        await job.process.wait()
        job.ended = True
        for waiter in job.waiters:
            waiter.set()

    async def stream_job_output(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        job_id, offset = "", 0
        for number, value in _fields(request):
            if number == 1 and isinstance(value, bytes):
                job_id = value.decode()
            elif number == 2 and isinstance(value, int):
                offset = value
        try:
            job_id = str(uuid.UUID(job_id))  # a name in the log directory, nothing else
            path = self.logs / f"{job_id}.log"
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (ValueError, FileNotFoundError):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
        try:
            job = self.jobs.get(job_id)
            if job is None or job.ended:  # a finished log: to its end
                while data := os.pread(fd, self.chunk_size, offset):
                    yield _output_chunk(offset, data)
                    offset += len(data)
                return
            async for chunk in self._follow(path, fd, offset, job):
                yield chunk
        finally:
            os.close(fd)

    async def _follow(self, path: Path, fd: int, offset: int, job: _Job) -> AsyncIterator[bytes]:
        """A running job's log from ``offset`` until the job has ended and all is sent."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_inotify(inotify_fd: int) -> None:
            os.read(inotify_fd, 4096)  # the events themselves do not matter: read on
            wake.set()

        with Inotify() as inotify:
            # Watch first, then read: a write between the two still wakes the stream.
            inotify.add_watch(path, Mask.MODIFY)
            loop.add_reader(inotify.fd, on_inotify, inotify.fd)
            job.waiters.add(wake)
            try:
                while True:
                    # Arm before reading; decide "ended" before the read that may find nothing.
                    wake.clear()
                    ended = job.ended
                    data = os.pread(fd, self.chunk_size, offset)
                    if data:
                        yield _output_chunk(offset, data)
                        offset += len(data)
                    elif ended:
                        return
                    else:
                        await wake.wait()
            finally:
                job.waiters.discard(wake)
                loop.remove_reader(inotify.fd)

    def kill_jobs(self) -> None:
        for job in self.jobs.values():
            if not job.ended and job.process.returncode is None:
                job.process.kill()


async def _serve(args: argparse.Namespace) -> None:
    peer = Peer(args.logs, args.chunk_size)
    credentials = grpc.ssl_server_credentials(
        [(args.key.read_bytes(), args.cert.read_bytes())],
        root_certificates=args.client_ca.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server(handlers=[peer.handler()], options=[("grpc.so_reuseport", 0)])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    print(port, flush=True)
    try:
        await stdin_closed()
    finally:
        peer.kill_jobs()
        await server.stop(None)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpcio_peer")
    parser.add_argument("--cert", type=Path, required=True, help="server certificate")
    parser.add_argument("--key", type=Path, required=True, help="server key")
    parser.add_argument("--client-ca", type=Path, required=True, help="CA of client certificates")
    parser.add_argument("--logs", type=Path, required=True, help="directory of the log files")
    parser.add_argument("--chunk-size", type=int, required=True, help="bytes per OutputChunk")
    args = parser.parse_args()
    if sys.version_info < (3, 12):
        # 3.12 waits for children on a pidfd by default; 3.11 starts a thread per child.
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
