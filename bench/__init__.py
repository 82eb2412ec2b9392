"""The jobworker benchmark suite: a real server over mutual TLS, each number beside its baseline.

Run it with ``nox -s bench`` (quick) or ``nox -s bench -- --full``, or from the repository
root with ``python -m bench [--quick | --full]``. It is not part of the ``jobworker`` package.
"""
