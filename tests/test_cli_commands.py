"""The commands and errors people reach for, through the real CLI against a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from helpers import JOBWORKER, Served, free_port, serving

from jobworker import __version__
from jobworker.cli._help import TEXT


@pytest.fixture
def served(tmp_path: Path, cgroup_root: Path) -> Iterator[Served]:
    with serving(tmp_path, cgroup_root) as server:
        yield server


def test_version() -> None:
    shown = subprocess.run([*JOBWORKER, "--version"], capture_output=True, check=False)
    assert (shown.returncode, shown.stdout.decode().split()[-1]) == (0, __version__)


# What a client command must not load: the server, the worker and its cgroup code, the PKI
# builder, and pydantic (typer and betterproto2 would each load it, for about 70 ms).
_NOT_FOR_CLIENTS = (
    "jobworker.server",
    "jobworker.worker",
    "jobworker.certs",
    "cryptography",
    "pydantic",
)


# Runs the CLI with the given words and prints the modules it loaded when it exits.
_REPORT_MODULES = """
import atexit, sys
def report():
    loaded = sorted(name for name, module in sys.modules.items() if module is not None)
    print("LOADED", *loaded, file=sys.stderr)
atexit.register(report)
sys.argv = ["jobworker", *sys.argv[1:]]
from jobworker.cli import main
main()
"""


@pytest.mark.parametrize(
    "words",
    [
        ("--help",),
        ("status", "{job}"),
        ("list", "-q"),
        ("logs", "--tail", "1", "{job}"),
        ("stream", "--offset", "0", "{job}"),
        ("start", "--env", "A=1", "--cwd", "/", "--json", "true"),
    ],
)
def test_client_commands_load_no_server_pki_or_pydantic_code(
    served: Served, words: tuple[str, ...]
) -> None:
    job = served.start("true")
    args = [word.replace("{job}", job) for word in words]
    done = subprocess.run(
        [JOBWORKER[0], "-c", _REPORT_MODULES, *args],
        env={**served.env, "COLUMNS": "80"},  # --help: wide enough for the copy
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = done.stderr.decode().rpartition("LOADED ")[2].split()
    assert "jobworker.cli" in report, "the report was read"
    assert [m for m in report if m.startswith(_NOT_FOR_CLIENTS)] == []
    if words[0] == "--help":
        assert [m for m in report if m.startswith(("typer", "grpclib", "jobworker.client"))] == []
    else:
        assert "typer" in report and "jobworker.client.client" in report


# Runs the CLI with the given words and says on stderr whether it set the C allocator.
_REPORT_MALLOC = """
import sys
import jobworker.malloc
tune = jobworker.malloc.tune_malloc
def reporting():
    applied = tune()
    print("TUNED", applied, file=sys.stderr)
    return applied
jobworker.malloc.tune_malloc = reporting
sys.argv = ["jobworker", *sys.argv[1:]]
from jobworker.cli import main
main()
"""


@pytest.mark.parametrize(
    ("words", "streams"),
    [
        (("logs", "{job}"), True),
        (("logs", "--tail", "1", "{job}"), True),
        (("stream", "{job}"), True),
        (("run", "--", "echo", "hi"), True),
        (("status", "{job}"), False),
        (("list", "-q"), False),
    ],
)
def test_the_commands_that_stream_output_set_the_c_allocator_for_it(
    served: Served, words: tuple[str, ...], streams: bool
) -> None:
    job = served.start("echo", "hello")
    args = [word.replace("{job}", job) for word in words]
    env = {k: v for k, v in served.env.items() if k != "GLIBC_TUNABLES" and "MALLOC_" not in k}
    done = subprocess.run(
        [JOBWORKER[0], "-c", _REPORT_MALLOC, *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    tuned = [line for line in done.stderr.decode().splitlines() if line.startswith("TUNED")]
    assert tuned == (["TUNED True"] if streams else []), done.stderr.decode()[-2000:]


def test_the_top_level_help_is_typers_and_its_copy_is_current() -> None:
    rendered = subprocess.run(
        [JOBWORKER[0], "-c", "from jobworker.cli.app import top_level_help as h; print(h())"],
        env={**os.environ, "TYPER_USE_RICH": "0"},
        capture_output=True,
        check=True,
    ).stdout.decode()[:-1]
    assert rendered == TEXT, "jobworker/cli/_help.py is out of date: run nox -s help"
    assert "Commands:" in rendered and "  logs " in rendered
    for option in ("--help", "-h"):
        wide = subprocess.run(
            [*JOBWORKER, option],
            env={**os.environ, "COLUMNS": "80"},
            capture_output=True,
            check=False,
        )
        assert (wide.returncode, wide.stdout.decode()) == (0, TEXT)
    # Narrower than click's 80 columns: typer wraps it, as it always did.
    narrow = subprocess.run(
        [*JOBWORKER, "--help"],
        env={**os.environ, "COLUMNS": "60"},
        capture_output=True,
        check=False,
    )
    text = narrow.stdout.decode()
    assert narrow.returncode == 0 and text != TEXT and "  logs " in text
    assert max(len(line) for line in text.splitlines()) <= 58


def test_logs_prints_what_is_there_and_the_tail(served: Served) -> None:
    job = served.start("sh", "-c", "for i in 1 2 3 4 5; do echo $i; done; sleep 60")
    assert served.cli("wait", "--timeout", "0.5", job).returncode == 1  # still running
    time.sleep(0.3)
    whole = served.cli("logs", job)
    assert (whole.returncode, whole.stdout) == (0, b"1\n2\n3\n4\n5\n")
    tail = served.cli("logs", "--tail", "2", job)
    assert tail.stdout == b"4\n5\n"
    served.cli("stop", job)


def test_logs_and_stream_put_each_lines_time_in_front_of_it(served: Served) -> None:
    # Each line is the job's own clock as it writes it: its time can be no earlier.
    job = served.start("sh", "-c", "for i in 1 2 3; do date +%s.%N; sleep 0.2; done; printf end")
    assert served.cli("wait", job).returncode == 0
    for args in (["logs", "-t", job], ["stream", "--timestamps", job]):
        out = served.cli(*args)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.decode().splitlines()
        assert len(lines) == 4, lines
        stamps = []
        for line in lines:
            stamp, text = line.split(" ", 1)
            at = datetime.fromisoformat(stamp)
            assert at.utcoffset() == at.astimezone().utcoffset(), "in this host's zone"
            if text != "end":
                assert at.timestamp() >= float(text) - 0.001, "stamped before it was written"
            stamps.append(at)
        assert stamps == sorted(stamps)
    tail = served.cli("logs", "-t", "--tail", "1", job).stdout.decode()
    assert tail.endswith(" end") and tail.count("\n") == 0, "the last line, stamped"
    plain = served.cli("logs", job).stdout.decode()
    assert plain.splitlines()[-1] == "end", "no stamps unasked"


def test_wait_exits_with_the_jobs_code_and_prefixes_name_jobs(served: Served) -> None:
    job = served.start("sh", "-c", "sleep 0.3; exit 6")
    waited = served.cli("wait", job[:8])  # a unique prefix names the job
    assert waited.returncode == 6, waited.stderr
    killed = served.start("sh", "-c", "kill -KILL $$")
    assert served.cli("wait", killed).returncode == 128 + signal.SIGKILL
    unknown = served.cli("status", "0000")
    assert unknown.returncode == 1 and unknown.stderr.startswith(b"error: ")


def test_list_filters_and_quiet_ids_and_json_on_start_and_stop(served: Served) -> None:
    running = served.start("sleep", "60")
    done = served.start("true")
    assert served.cli("wait", done).returncode == 0
    quiet = served.cli("list", "-q", "--state", "running")
    assert quiet.stdout.decode().split() == [running]
    both = served.cli("list", "-q", "--state", "running", "--state", "completed")
    assert sorted(both.stdout.decode().split()) == sorted([running, done])
    bogus = served.cli("list", "--state", "bogus")
    assert bogus.returncode == 2 and bogus.stdout == b""
    assert bogus.stderr.decode().count("\n") == 1, "one line"
    assert "'bogus' is not one of 'running', 'completed'" in bogus.stderr.decode()
    started = served.cli("start", "--json", "--", "true")
    assert json.loads(started.stdout)["state"] == "running"
    stopped = served.cli("stop", "--json", running)
    assert json.loads(stopped.stdout)["state"] == "stopped"
    assert b"stopping" in stopped.stderr, "stop says what it is doing while it waits"


def test_global_options_after_the_command_and_a_bare_host(served: Served) -> None:
    env = {k: v for k, v in served.env.items() if k != "JOBWORKER_SERVER"}
    after = served.cli("list", "--server", f"127.0.0.1:{served.port}", env=env)
    assert after.returncode == 0, after.stderr
    bare = served.cli("--server", "127.0.0.1", "list", env=env)  # the default port, 50051
    assert bare.returncode == 1
    assert b"127.0.0.1:50051" in bare.stderr and bare.stderr.count(b"\n") == 1


def test_usage_errors_are_one_line_and_exit_2(served: Served) -> None:
    for args in (["status"], ["start"], ["stop", "a", "--no-such-option"]):
        refused = served.cli(*args)
        assert refused.returncode == 2, args
        assert refused.stderr.startswith(b"error: ") and refused.stderr.count(b"\n") == 1, args


def test_a_missing_certificate_file_is_named(served: Served, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    refused = served.cli("--cert", str(missing), "list")
    assert refused.returncode == 1
    assert str(missing).encode() in refused.stderr and refused.stderr.count(b"\n") == 1


def test_a_listener_that_never_speaks_tls_times_out(served: Served) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        env = {**served.env, "JOBWORKER_SERVER": f"127.0.0.1:{port}"}
        began = time.monotonic()
        refused = served.cli("--timeout", "1", "list", env=env)
    assert refused.returncode == 1 and refused.stderr.startswith(b"error: ")
    assert time.monotonic() - began < 30, "the CLI gave up on its own"


def _complete(served: Served, words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the last of ``words`` (a ``jobworker`` command line)."""
    env = {
        **(env or served.env),
        "_JOBWORKER_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    done = served.cli(env=env)
    assert (done.returncode, done.stderr) == (0, b"")
    return done.stdout.decode().split()


def test_the_shell_completes_job_ids_from_the_server(served: Served) -> None:
    first = served.start("sleep", "60")
    second = served.start("true")
    assert sorted(_complete(served, "jobworker status ")) == sorted([first, second])
    assert _complete(served, f"jobworker stop {first[:4]}") == [first]
    assert second in _complete(served, f"jobworker wait {first[:8]} ")
    assert _complete(served, "jobworker logs zzz") == []
    # A server that cannot be reached: nothing to offer, and no error in the user's prompt.
    env = {**served.env, "JOBWORKER_SERVER": f"127.0.0.1:{free_port()}"}
    assert _complete(served, "jobworker status ", env) == []
    served.cli("stop", first)


def test_serve_says_at_start_how_many_jobs_this_host_allows(served: Served) -> None:
    log = served.log.read_text()
    assert "this host allows about" in log and "open files" in log
