"""A fork server for the tests' stage processes (the idea of multiprocessing's forkserver).

Starting ``python -m orderq <stage>`` costs a fresh interpreter and ~0.5 s of CPU importing
redis, starlette, structlog (with rich, which the test extra brings) and orderq itself; the
suite starts a few hundred stage processes, so on a 2-core machine that was a fifth of its CPU.
This process imports all of it once and forks a child per stage: each child is still a real
OS process of its own (its own pid, signals, exit code, log file and environment) running the
same entry point as ``python -m orderq <stage>``, ``orderq.cli.main``.

Protocol, one JSON object a line: on stdin ``{"argv", "env", "cwd", "log"}`` asks for a child,
answered on stdout ``{"pid"}``; every child's end is reported as ``{"exit": pid, "rc"}`` (``rc``
as ``subprocess.Popen.returncode``: negative for a signal). End of stdin ends the server.
Used by tests/conftest.py; ``ORDERQ_TEST_FORK=0`` there starts plain processes instead.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import signal
import sys
from typing import Any

import orderq.cli

# What the stages import, so the children find it loaded (see orderq/cli.py's dispatch).
PRELOAD = (
    "breaker.controller",
    "connect.app",
    "dispatch.worker",
    "execute.routing",
    "execute.worker",
    "ingress.app",
    "ingress.channels",
    "orderq.logs",
    "orderq.runner",
    "orderq.tokens",
    "validate.worker",
)


def _child(req: dict[str, Any], parent_fds: list[int]) -> None:
    """In the forked child: become ``python -m orderq <argv>`` and never return."""
    rc: Any = 1
    try:
        for fd in parent_fds:
            os.close(fd)
        # The signal dispositions of a fresh interpreter: the server's own handlers go, and
        # SIGPIPE and SIGXFSZ stay ignored as CPython sets them at start-up (with SIGPIPE at its
        # default, a write to a socket its client closed would kill the stage without a word).
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own fds
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = ["orderq", *req["argv"]]
        try:
            rc = orderq.cli.main(req["argv"])
        except SystemExit as exc:
            rc = exc.code
        rc = 0 if rc is None else rc if isinstance(rc, int) else 1
    except BaseException:  # what the interpreter would print before exiting 1
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout.buffer
    rfd, wfd = os.pipe()  # SIGCHLD wakes the loop through this pipe
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches pytest; the server ends with its stdin
    sel = selectors.DefaultSelector()
    stdin = sys.stdin.buffer
    sel.register(stdin, selectors.EVENT_READ, "req")
    sel.register(rfd, selectors.EVENT_READ, "chld")

    def send(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc).encode() + b"\n")
        out.flush()

    while True:
        for key, _ in sel.select():
            if key.data == "chld":
                os.read(rfd, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                    send({"exit": pid, "rc": rc})
                continue
            line = stdin.readline()
            if not line:
                return
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(req, [rfd, wfd])
            send({"pid": pid})


if __name__ == "__main__":
    main()
