"""jobworker: run programs on Linux hosts in their own cgroup v2 and stream their output."""

__version__ = "0.1.0"
