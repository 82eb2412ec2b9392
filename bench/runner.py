"""``python -m bench [--quick | --full]``: run every measurement, report, plot.

Each measurement runs against a fresh server process, so one's leftovers (jobs, memory) do
not colour the next. A measurement that breaks (an error, wrong bytes) is reported with what
it had measured so far; the others still run, and the exit status is 1. Timings never fail
the run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from bench import cli, follow, isolation, output_cap, scale, start, throughput
from bench.common import FULL, QUICK, Context, Section
from bench.proc import MachineCpu, raise_nofile
from bench.report import background_note, machine, markdown_table, plot, text_table, write_json
from bench.server import Workspace

Measure = Callable[[Context, Section], Awaitable[None]]
SECTIONS: dict[str, Measure] = {
    "start": start.measure,
    "isolation": isolation.measure,
    "throughput": throughput.measure,
    "follow": follow.measure,
    "output_cap": output_cap.measure,
    "scale": scale.measure,
    "cli": cli.measure,
}


def describe(exc: BaseException) -> str:
    """The distinct errors in an exception, its groups and the errors it was raised during."""
    seen: list[str] = []

    def walk(e: BaseException | None, depth: int = 0) -> None:
        if e is None or depth > 10:
            return
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub, depth + 1)
        else:
            text = f"{type(e).__name__}: {e}"
            if text not in seen:
                seen.append(text)
        walk(e.__cause__ or e.__context__, depth + 1)

    walk(exc)
    return "; then ".join(reversed(seen[:4]))  # the first failure first


def python_version(python: str) -> str:
    """``3.12`` for an interpreter that is Python 3.12."""
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    return subprocess.run(
        [python, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const=QUICK,
        dest="mode",
        help="small sizes, for CI (the default)",
    )
    size.add_argument(
        "--full",
        action="store_const",
        const=FULL,
        dest="mode",
        help="the sizes docs/performance.md reports",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SECTIONS),
        metavar="NAME",
        help=f"run only this measurement (repeatable): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="where results.json, results.md and bench.png go",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="concurrent jobs (and followers) in the scale measurement [quick: 200, full: 10000]",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="the server's --chunk-size (and the baselines' read size)",
    )
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="interpreter (with jobworker installed) for the server and jobs",
    )
    parser.add_argument(
        "--scale-python",
        action="append",
        default=[],
        metavar="PYTHON",
        help="also run the scale measurement with the server on this interpreter (with "
        "jobworker installed); repeatable",
    )
    parser.add_argument(
        "--server-nofile",
        type=int,
        default=None,
        help="the server's soft open-file limit, as under `ulimit -n` [default: the hard limit]",
    )
    parser.add_argument(
        "--cgroup-parent",
        type=Path,
        default=None,
        help="cgroup v2 directory to create the benchmark's cgroup in",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="also copy the plot to docs/performance.png (do this in full mode)",
    )
    args = parser.parse_args(argv)
    args.mode = args.mode or QUICK
    if args.jobs is not None:
        if args.jobs < 1:
            parser.error("--jobs must be at least 1")
        args.mode = replace(args.mode, scale_jobs=args.jobs)
    return args


async def _run(args: argparse.Namespace) -> list[Section]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)  # clean up as on Ctrl-C
    sections = []
    with Workspace(args.cgroup_parent, args.out) as workspace:
        ctx = Context(args.mode, workspace, args.server_python, args.chunk_size, args.server_nofile)
        runs: list[tuple[str, Measure, Context]] = []
        for name, measure in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            if name == "scale" and args.scale_python:
                # One section per server interpreter, each named after its version.
                for python in [args.server_python, *args.scale_python]:
                    other = replace(ctx, python=python)
                    runs.append((f"scale py{python_version(python)}", measure, other))
            else:
                runs.append((name, measure, ctx))
        for name, measure, run_ctx in runs:
            section = Section(name)
            sections.append(section)
            print(f"-- {name} ...", file=sys.stderr, flush=True)
            t0, cpu0 = time.perf_counter(), MachineCpu.now()
            try:
                await measure(run_ctx, section)
            except Exception as exc:  # noqa: BLE001 - reported, and the run exits 1
                section.error = describe(exc) + f" (server logs in {args.out}/)"
                traceback.print_exc()
            section.seconds = time.perf_counter() - t0
            section.background_cores = MachineCpu.now().others_since(cpu0) / section.seconds
            print(f"   {name}: {section.seconds:.1f} s", file=sys.stderr, flush=True)
    return sections


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # The scale measurement's server holds about two descriptors per job, and the bench as many.
    soft, hard = raise_nofile(at_least=4 * args.mode.scale_jobs + 4096)
    t0 = time.perf_counter()
    try:
        sections = asyncio.run(_run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (see _run)
        print("interrupted: servers stopped, jobs and cgroups removed", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    info: dict[str, object] = {
        "machine": machine(),
        "wall_seconds": wall,
        "chunk_bytes": args.chunk_size,
        "nofile": f"{soft}/{hard}",
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", args.mode.name, info, sections)
    (out / "results.md").write_text(
        markdown_table(sections) + "\n\n" + background_note(sections) + "\n"
    )
    host = info["machine"]
    assert isinstance(host, dict)
    title = (
        f"jobworker {args.mode.name} benchmark — {host['nproc']} x {host['cpu']}, "
        f"Linux {host['kernel']}, Python {host['python']}"
    )
    plotted = plot(out / "bench.png", title, sections)
    print(text_table(sections))
    print(
        f"\n{args.mode.name} mode, {wall:.0f} s; results in {out}/results.json"
        + (f", plot in {out}/bench.png" if plotted else "; no plot: matplotlib is not installed")
    )
    if args.docs and plotted:
        shutil.copyfile(
            out / "bench.png", Path(__file__).resolve().parent.parent / "docs" / "performance.png"
        )
    return 1 if any(s.error for s in sections) else 0
