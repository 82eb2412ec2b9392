"""The worker's models; they live in :mod:`jobworker.models`, shared with the client."""

from jobworker.models import (
    LIMIT_CONTROLLERS,
    LIMIT_RANGES,
    MAX_COMMAND_BYTES,
    MAX_OUTPUT_RANGE,
    JobSpec,
    JobState,
    JobStatus,
    Limits,
    Network,
    OutputChunk,
    Usage,
    new_job_id,
    parse_job_id,
)

__all__ = [
    "LIMIT_CONTROLLERS",
    "LIMIT_RANGES",
    "MAX_COMMAND_BYTES",
    "MAX_OUTPUT_RANGE",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Limits",
    "Network",
    "OutputChunk",
    "Usage",
    "new_job_id",
    "parse_job_id",
]
