"""The results: a table on stdout, JSON, a Markdown table, and a plot."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import Row, Section

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for package in ("grpclib", "h2", "betterproto2", "anyio", "asyncinotify", "grpcio"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory": _meminfo_total(),
        **versions,
        "commit": _commit(),
    }


def _meminfo_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def _commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        )
    except OSError:
        return "?"
    return result.stdout.strip() or "?"


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cells(row: Row) -> list[str]:
    ratio, vs_grpcio = row.ratio, row.vs_grpcio
    return [
        row.section,
        row.metric,
        f"{_fmt(row.value)} {row.unit}",
        f"{_fmt(row.baseline)} {row.unit}" if row.baseline is not None else "",
        f"{ratio:.2f}x" if ratio is not None else "",
        row.baseline_name,
        f"{_fmt(row.grpcio)} {row.unit}" if row.grpcio is not None else "",
        f"{vs_grpcio:.2f}x" if vs_grpcio is not None else "",
        row.note,
    ]


# "grpcio" is the same measurement against the grpcio peer (bench/grpcio_peer.py).
_HEADER = [
    "section",
    "metric",
    "jobworker",
    "baseline",
    "ratio",
    "baseline is",
    "grpcio",
    "vs grpcio",
    "notes",
]


def text_table(sections: Sequence[Section]) -> str:
    rows = [_HEADER] + [_cells(r) for s in sections for r in s.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(background_note(sections))
    for section in sections:
        if section.error:
            lines.append(f"ERROR in {section.name}: {section.error}")
    return "\n".join(lines)


def background_note(sections: Sequence[Section]) -> str:
    """How busy the rest of the machine was: numbers from a busy machine mean less."""
    parts = ", ".join(f"{s.name} {s.background_cores:.2f}" for s in sections)
    return f"other processes' CPU use during each measurement (cores of {os.cpu_count()}): {parts}"


def markdown_table(sections: Sequence[Section]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for section in sections:
        for row in section.rows:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    return "\n".join(lines)


def write_json(path: Path, mode: str, info: dict[str, object], sections: Sequence[Section]) -> None:
    document = {
        "mode": mode,
        **info,
        "sections": {
            s.name: {
                "seconds": s.seconds,
                "background_cores": s.background_cores,
                "error": s.error,
                "rows": [
                    {
                        "metric": r.metric,
                        "value": r.value,
                        "unit": r.unit,
                        "baseline": r.baseline,
                        "baseline_name": r.baseline_name,
                        "ratio": r.ratio,
                        "grpcio": r.grpcio,
                        "vs_grpcio": r.vs_grpcio,
                        "note": r.note,
                    }
                    for r in s.rows
                ],
                "data": s.data,
            }
            for s in sections
        },
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _row(sections: Sequence[Section], section: str, metric: str) -> Row | None:
    for s in sections:
        for r in s.rows:
            if s.name == section and r.metric == metric:
                return r
    return None


GRPCIO_COLOR = "#ff7f0e"


def plot(path: Path, title: str, sections: Sequence[Section]) -> bool:
    """The throughput and latency results as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional: only the nox session installs it

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, axes = plt.subplots(
        1, 3, figsize=(16, 4.8), layout="constrained", gridspec_kw={"width_ratios": [1.7, 1, 1]}
    )
    fig.suptitle(title, fontsize=10)
    jw_color, base_color = "#1f77b4", "#aaaaaa"

    # Throughput.
    ax = axes[0]
    bars: list[tuple[str, float, str]] = []
    clients = next(
        (r for s in sections for r in s.rows if r.metric.endswith("clients, aggregate")), None
    )
    for r, label in (
        (_row(sections, "throughput", "1 client, live"), "1 client, live"),
        (_row(sections, "throughput", "1 client, finished job"), "1 client"),
        (clients, clients.metric.replace(", ", "\n") if clients else ""),
    ):
        if r is not None:
            bars.append(("jobworker\n" + label, r.value, jw_color))
            if r.grpcio is not None:
                bars.append(("grpcio\n" + label, r.grpcio, GRPCIO_COLOR))
    tls = _row(sections, "throughput", "plain TLS 1.3 socket")
    if tls is not None:
        bars.append(("plain TLS\nsocket", tls.value, base_color))
        if tls.baseline is not None:
            bars.append(("plain file\nreads", tls.baseline, base_color))
    if bars:
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_yscale("log")
        for i, (_, value, _) in enumerate(bars):
            ax.annotate(f"{value:.0f}", (i, value), ha="center", va="bottom", fontsize=8)
    ax.set_title("Output throughput (MiB/s, log scale)")
    ax.tick_params(axis="x", labelsize=7)

    _latency_panel(axes[1], sections, "start", "StartJob", "Start latency (ms)")
    _latency_panel(axes[2], sections, "follow", "follow delay", "Follow latency (ms)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _latency_panel(
    ax: Axes, sections: Sequence[Section], section: str, prefix: str, title: str
) -> None:
    labels, jw, grpcio, base = [], [], [], []
    for q in ("p50", "p99"):
        r = _row(sections, section, f"{prefix} {q}")
        if r is not None:
            labels.append(q)
            jw.append(r.value)
            grpcio.append(r.grpcio if r.grpcio is not None else math.nan)
            base.append(r.baseline if r.baseline is not None else math.nan)
    baseline_name = next(
        (r.baseline_name for s in sections for r in s.rows if s.name == section), "baseline"
    )
    width = 0.27
    xs = range(len(labels))
    for shift, values, label, color in (
        (-width, jw, "jobworker", "#1f77b4"),
        (0.0, grpcio, "grpcio peer", GRPCIO_COLOR),
        (width, base, baseline_name, "#aaaaaa"),
    ):
        ax.bar([x + shift for x in xs], values, width, label=label, color=color)
        for x, value in enumerate(values):
            if not math.isnan(value):
                ax.annotate(
                    f"{value:.2f}", (x + shift, value), ha="center", va="bottom", fontsize=7
                )
    ax.set_xticks(list(xs), labels)
    ax.set_title(title)
    ax.legend(fontsize=8)
