"""``jobworker --help`` as typer renders it at 80 columns, which
``jobworker.cli.main`` prints without loading typer.

Written by ``nox -s help`` from ``jobworker.cli.app.top_level_help``; a test in
tests/test_cli_commands.py fails while the two differ. Do not edit.
"""

TEXT = (
    "Usage: jobworker [OPTIONS] COMMAND [ARGS]...\n"
    "\n"
    "  Run programs on this host in their own cgroup, and stream their output, over\n"
    "  mTLS.\n"
    "\n"
    "Options:\n"
    "  --server <str>        Server address: HOST:PORT, or HOST (port 50051).  [env\n"
    "                        var: JOBWORKER_SERVER; default: 127.0.0.1:50051]\n"
    "  --cert <path>         Client certificate [default: admin.pem of the local\n"
    "                        server's PKI].  [env var: JOBWORKER_CERT]\n"
    "  --key <path>          Client private key [default: admin-key.pem of the\n"
    "                        local server's PKI].  [env var: JOBWORKER_KEY]\n"
    "  --ca <path>           Server CA to trust [default: server-ca.pem of the\n"
    "                        local server's PKI].  [env var: JOBWORKER_CA]\n"
    "  --timeout SECONDS     How long a call may take to answer, 0 for no limit\n"
    "                        [default: 10].  [env var: JOBWORKER_TIMEOUT]\n"
    "  --version             Print the version and exit.\n"
    "  --install-completion  Install completion for the current shell.\n"
    "  --show-completion     Show completion for the current shell, to copy it or\n"
    "                        customize the installation.\n"
    "  -h, --help            Show this message and exit.\n"
    "\n"
    "Commands:\n"
    "  start   Start a job; print its id (or its status with --json).\n"
    "  stop    Stop a job: SIGTERM, a grace period, then SIGKILL to its whole...\n"
    "  status  Show a job's status.\n"
    "  rm      Remove ended jobs: their records, output and working directories.\n"
    "  prune   Remove every ended job you may see (or those that ended...\n"
    "  list    List the jobs you may see, oldest first (ids in the table are...\n"
    "  stream  Write a job's output to stdout, from the start (or --offset),...\n"
    "  logs    Print a job's output so far and exit; with -f, follow it until...\n"
    "  wait    Wait until the jobs have ended; exit with the last one's exit...\n"
    "  run     Start a job, stream its output, and exit with its exit code...\n"
    "  serve   Run the jobworker server until SIGTERM or SIGINT.\n"
    "  certs   Create the PKI (two CAs, server and admin certificates) and...\n"
)
