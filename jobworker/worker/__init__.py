"""The worker library: jobs in their own cgroup v2, output in log files, live output streams.

It knows nothing of gRPC or TLS; the server and the CLI are thin edges around it.
"""

from jobworker.models import (
    JobSpec,
    JobState,
    JobStatus,
    Limits,
    Network,
    OutputChunk,
    Usage,
    parse_job_id,
)
from jobworker.worker.config import WorkerConfig
from jobworker.worker.logs import OutputStream
from jobworker.worker.worker import Worker

__all__ = [
    "JobSpec",
    "JobState",
    "JobStatus",
    "Limits",
    "Network",
    "OutputChunk",
    "OutputStream",
    "Usage",
    "Worker",
    "WorkerConfig",
    "parse_job_id",
]
