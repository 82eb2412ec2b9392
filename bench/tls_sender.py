"""The plain TLS 1.3 baseline: send a file over mutual TLS on loopback, with asyncio streams.

``python -m bench.tls_sender --file F --chunk N --cert ... --key ... --ca ...`` listens on
127.0.0.1, prints its port, and sends the whole file to every client that connects (pread in
``chunk``-sized pieces, write, drain), just as the server reads a log file, minus gRPC. It
uses the server's own TLS settings. It exits when its standard input closes, so it never
outlives the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bench.stdin import stdin_closed
from jobworker.server.tls import server_ssl_context


async def _send(path: str, chunk: int, writer: asyncio.StreamWriter) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while data := os.pread(fd, chunk, offset):
            offset += len(data)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass  # the client went away
    finally:
        writer.close()  # flushes what is buffered, then closes
        os.close(fd)


async def _main(args: argparse.Namespace) -> None:
    context = server_ssl_context(args.cert, args.key, args.ca)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline():
            await _send(args.file, args.chunk, writer)
        else:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    async with server:
        await stdin_closed()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", required=True)
    parser.add_argument("--chunk", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
