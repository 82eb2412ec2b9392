"""A job's write rate with and without an output cap, side by side in one run.

A job writes ``throughput_mib * 4`` MiB of zeros as fast as it can (``head -c``) into its
log; capped, the worker keeps its head and tail and punches holes in the middle as it grows
(docs/design.md, "Bounded output and retention"). The rate is the job's own: its bytes over
its life (start to end, as its status says). The two runs alternate, three times each.
"""

from __future__ import annotations

from bench.common import Context, Section
from bench.stats import MIB, median

_CAP = 16 * MIB


async def measure(ctx: Context, out: Section) -> None:
    size = ctx.mode.throughput_mib * 4 * MIB
    rates: dict[str, list[float]] = {"uncapped": [], "capped": []}
    dropped = 0
    async with ctx.server("output_cap") as server, server.client() as client:
        for _ in range(3):
            for name, cap in (("uncapped", None), ("capped", _CAP)):
                job = await client.start("head", ["-c", str(size), "/dev/zero"], max_output=cap)
                final = await client.wait(job.id)
                if final.exit_code != 0 or final.ended_at is None:
                    raise RuntimeError(f"the {name} writer ended badly: {final}")
                seconds = (final.ended_at - final.started_at).total_seconds()
                rates[name].append(size / MIB / seconds)
                if cap is not None:
                    dropped = final.output_dropped
    capped, uncapped = median(rates["capped"]), median(rates["uncapped"])
    out.add(
        f"job writing {size // MIB} MiB, capped at {_CAP // MIB} MiB",
        capped,
        "MiB/s",
        uncapped,
        "the same job uncapped",
        note=f"{dropped // MIB} MiB dropped from the middle",
    )
    out.data = {"size_mib": size // MIB, "cap_mib": _CAP // MIB, "rates_mib_s": rates}
