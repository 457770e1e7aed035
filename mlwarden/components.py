"""Start the real components (Prometheus, Alertmanager, Pushgateway, Redis, an S3 server) on loopback.

The demo and the test suite use the same launcher, so what the tests prove is what the
demo shows. Every component gets a free port on 127.0.0.1 and a private data directory,
is waited on until it answers its readiness endpoint, and is stopped (SIGTERM, then
SIGKILL) when the ``with`` block ends; nothing is left running.

The Debian packages provide the binaries: ``prometheus``, ``prometheus-alertmanager``,
``prometheus-pushgateway``, ``redis-server``. ``.ci/run`` and ``make`` install them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

LOOPBACK = "127.0.0.1"

# component -> (the Debian package that brings it, its executable names in lookup order;
# upstream tarballs call Alertmanager and the Pushgateway by their short names).
INSTALLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prometheus": ("prometheus", ("prometheus",)),
    "promtool": ("prometheus", ("promtool",)),
    "alertmanager": ("prometheus-alertmanager", ("prometheus-alertmanager", "alertmanager")),
    "amtool": ("prometheus-alertmanager", ("amtool",)),
    "pushgateway": ("prometheus-pushgateway", ("prometheus-pushgateway", "pushgateway")),
    "redis": ("redis-server", ("redis-server",)),
}


class ComponentError(RuntimeError):
    """A component is not installed, or did not become ready."""


def find_binary(component: str) -> str:
    """Path of a component's executable, or a ComponentError naming the package to install."""
    package, executables = INSTALLS[component]
    for name in executables:
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    raise ComponentError(
        f"{executables[0]} not found: install the Debian package "
        f"'{package}' (apt-get install -y --no-install-recommends {package})"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def wait_until(condition: Callable[[], Any], timeout: float, what: str = "condition", poll: float = 0.05) -> Any:
    """Poll ``condition()`` until it returns something truthy and return that; TimeoutError naming ``what``.

    The condition is asked once more after the deadline, so a slow poll cannot miss the last chance.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


class Component:
    """One running process of a real component, ready when ``start()`` returns."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        workdir: Path,
        ready: Callable[[Component], bool],
        ready_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.env = env
        self.argv = list(argv)
        self.port = port
        self.workdir = Path(workdir)
        self._ready = ready
        self._ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} not started"
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> Component:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the process runs; stop() closes it
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self.env,
            start_new_session=True,  # Ctrl-C in the demo reaches us, and we stop it cleanly
        )
        try:
            wait_until(self._ready_or_exited, self._ready_timeout, f"{self.name} to be ready", poll=0.1)
        except (ComponentError, TimeoutError) as error:
            self.stop()
            raise ComponentError(f"{error}: {self.log_tail()}") from error
        return self

    def _ready_or_exited(self) -> bool:
        """Readiness; a process that has already exited will never be ready, so that is an error."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise ComponentError(f"{self.name} exited with {self.process.returncode}")
        return self._ready(self)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def reload(self) -> None:
        """Ask the process to re-read its configuration (SIGHUP)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Component:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def http_ready(path: str) -> Callable[[Component], bool]:
    """Readiness check: GET ``path`` answers 2xx."""
    return lambda component: http_ok(component.url + path)


def prometheus(config_file: Path, workdir: Path, extra_args: Sequence[str] = ()) -> Component:
    """Prometheus with ``config_file``; the lifecycle API is on so tests can reload it."""
    port = free_port()
    argv = [
        find_binary("prometheus"),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--web.enable-lifecycle",
        "--web.enable-admin-api",
        *extra_args,
    ]
    return Component("prometheus", argv, port, workdir, http_ready("/-/ready"))


def alertmanager(config_file: Path, workdir: Path, extra_args: Sequence[str] = ()) -> Component:
    """A single Alertmanager (clustering off) with ``config_file``."""
    port = free_port()
    argv = [
        find_binary("alertmanager"),
        f"--config.file={config_file}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--cluster.listen-address=",
        *extra_args,
    ]
    return Component("alertmanager", argv, port, workdir, http_ready("/-/ready"))


def pushgateway(workdir: Path, extra_args: Sequence[str] = ()) -> Component:
    port = free_port()
    # Debian's build persists to a shared /var/lib file by default: every instance would
    # start with the groups of the others. Each gets its own file in its workdir.
    argv = [
        find_binary("pushgateway"),
        f"--web.listen-address={LOOPBACK}:{port}",
        f"--persistence.file={workdir / 'pushgateway.data'}",
        *extra_args,
    ]
    return Component("pushgateway", argv, port, workdir, http_ready("/-/ready"))


def _redis_ready(component: Component) -> bool:
    try:
        with socket.create_connection((LOOPBACK, component.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis(workdir: Path) -> Component:
    """redis-server on loopback, persistence off, data in ``workdir``."""
    port = free_port()
    argv = [
        find_binary("redis"),
        "--bind", LOOPBACK,
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
    ]
    return Component("redis", argv, port, workdir, _redis_ready)


class S3Server:
    """moto's S3 API over real HTTP (``ThreadedMotoServer``), not the in-process mock.

    Credentials are dummies; clients must use ``endpoint_url``.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer  # test and demo dependency only

        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self._server.start()
        try:
            wait_until(lambda: _tcp_open(self.port), 15, "the S3 server to listen")
        except TimeoutError as error:
            self.stop()
            raise ComponentError(str(error)) from error
        return self

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.stop()
            self._server = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False
