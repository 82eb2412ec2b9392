"""Output caps end to end: `jobworker serve` with a default and a maximum, the CLI, the wire."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import JOB_PYTHON, Served, serving
from test_output_cap import WRITER, pattern

from jobworker.client import Client
from jobworker.models import OutputChunk

MiB = 1 << 20


@pytest.fixture
def cli(tmp_path: Path, cgroup_root: Path) -> Iterator[Served]:
    """The CLI against a server with a default and a maximum output cap."""
    with serving(
        tmp_path, cgroup_root, "--default-max-output", "2M", "--max-max-output", "8M"
    ) as server:
        yield server


def test_stream_prints_head_one_gap_line_and_tail_and_status_counts(cli: Served) -> None:
    total = 8 * MiB
    started = cli("start", "--max-output", "2M", "--", JOB_PYTHON, "-c", WRITER, str(total))
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    assert cli("wait", job_id).returncode == 0

    status = json.loads(cli("status", "--json", job_id).stdout)
    assert (status["max_output"], status["output_bytes"]) == (2 * MiB, total)
    assert status["output_lost"] is False
    resume = MiB + status["output_dropped"]
    assert MiB < resume < total - MiB // 2

    streamed = cli("stream", job_id)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == pattern(0, MiB) + pattern(resume, total - resume), (
        "the head and the tail, byte-exact, and no zeros for the dropped bytes"
    )
    assert streamed.stderr.decode().splitlines() == [
        f"jobworker: bytes {MiB}..{resume} of the output were dropped "
        "(the job's output cap keeps its head and tail)"
    ]
    for args in (("logs", job_id), ("logs", "--follow", job_id)):
        printed = cli(*args)
        assert (printed.stdout, printed.stderr) == (streamed.stdout, streamed.stderr), args
    shown = cli("status", job_id).stdout.decode()
    assert f"output:     {total} bytes written, {resume - MiB} dropped (cap 2M)" in shown


def test_the_server_default_applies_and_its_maximum_is_enforced(cli: Served) -> None:
    started = cli("start", "--json", "--", "true")
    assert json.loads(started.stdout)["max_output"] == 2 * MiB
    refused = cli("start", "--max-output", "9M", "--", "true")
    assert refused.returncode == 1
    assert b"max_output 9M is above this worker's maximum 8M" in refused.stderr
    assert len(json.loads(cli("list", "--json").stdout)) == 1, "no job for the refused start"
    bad = cli("start", "--max-output", "lots", "--", "true")
    assert (bad.returncode, bad.stderr.startswith(b"error: --max-output:")) == (1, True)


@pytest.mark.anyio
async def test_the_client_library_skips_gaps_in_bytes_and_lists_them(cli: Served) -> None:
    total = 4 * MiB
    started = cli("start", "--max-output", "1M", "--", JOB_PYTHON, "-c", WRITER, str(total))
    job_id = started.stdout.decode().strip()
    assert cli("wait", job_id).returncode == 0
    async with Client.from_env(cli.env) as client:
        dropped = (await client.status(job_id)).output_dropped
        resume = MiB // 2 + dropped
        async with client.output(job_id) as output:
            data = b"".join([piece async for piece in output])
        assert output.gaps == [(MiB // 2, resume)]
        assert data == pattern(0, MiB // 2) + pattern(resume, total - resume)
        async with client.output(job_id, MiB) as output:
            first = await output.next_chunk()
        assert first == OutputChunk(MiB, b"", dropped=resume - MiB)
