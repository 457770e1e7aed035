"""The Containerfile builds, and the image serves the exporter: built on a Debian base made here.

No image registry is reachable in CI, so the base image is Debian's own packages:
``debootstrap`` (python3, its venv module and CA certificates) from the mirror apt uses, imported
with ``podman import``. ``buildah bud`` (vfs storage, chroot isolation: no daemon, no overlay
mounts) builds the Containerfile on it, installing from a wheelhouse made here with pip, so the
build needs no index either. ``buildah run`` then starts ``mlwarden exporter`` inside the image
(``podman run`` does not work on these machines) and the test scrapes ``/metrics`` from outside.

The debootstrapped root filesystem is cached as a tarball (``$XDG_CACHE_HOME/mlwarden-tests``);
image storage is a temporary directory, removed after the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fresh_clone
import pytest

import mlwarden
from mlwarden.components import free_port, wait_until
from tests.test_exporter_attribution import kubelet, pod  # noqa: F401  (kubelet is a fixture)

BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_IMAGE = "localhost/mlwarden-test-base:latest"
IMAGE = "localhost/mlwarden-test:latest"
SIMULATED_GPU_1 = "GPU-5e1a7ed0-0000-4000-8000-000000000001"  # the simulated backend's second GPU
DEBIAN_PYTHON = "/usr/bin/python3"  # from the same mirror and suite as the debootstrapped base
pytestmark = pytest.mark.timeout(900)  # a cold run debootstraps: minutes, not seconds


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert found, f"{name} is missing: scripts/debian-packages.txt lists it (make bootstrap installs it as root)"
    return found


def debian_mirror() -> tuple[str, str]:
    """The Debian archive and release apt installs from (deb822 .sources or one-line lists)."""
    texts = [path.read_text() for path in (Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*")))
             if path.is_file()]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and "URIs" in fields and "Suites" in fields:
                uri, suite = fields["URIs"].split()[0], fields["Suites"].split()[0]
                if "security" not in uri and "-" not in suite:
                    return uri, suite
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "debian" in parts[1] and "security" not in parts[1]:
                return parts[1], parts[2]
    raise AssertionError("no Debian mirror in /etc/apt/sources.list*")


def base_rootfs() -> Path:
    """A tarball of a minimal Debian with python3; made once with debootstrap, then cached."""
    uri, suite = debian_mirror()
    key = hashlib.sha256(f"{uri} {suite} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlwarden-tests"
    tarball = cache / f"debian-{suite}-python3-{key}.tar"
    if tarball.is_file():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = cache / f".rootfs-{os.getpid()}"
    try:
        made = subprocess.run(
            [_tool("debootstrap"), "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), uri],
            capture_output=True, text=True, timeout=600,
        )
        assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
        partial = tarball.with_suffix(f".{os.getpid()}.partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def _context(destination: Path) -> Path:
    """A fresh clone's files, plus a wheelhouse of every dependency."""
    fresh_clone.copy_to(destination)
    # Resolved by Debian's own python3, the release the image runs: dependencies with markers on
    # the Python version (redis needs async-timeout below 3.11.3) come out as the image needs them.
    subprocess.run([sys.executable, "-m", "pip", "--python", DEBIAN_PYTHON, "wheel", "--quiet", "--wheel-dir",
                    str(destination / "wheelhouse"), f"{destination}[kubernetes]", "setuptools>=77"], check=True, cwd=destination)
    return destination


class Buildah:
    def __init__(self, storage: Path) -> None:
        self.global_args = ["--root", str(storage / "root"), "--runroot", str(storage / "run"), "--storage-driver", "vfs"]

    def command(self, tool: str, *args: str) -> list[str]:
        return [_tool(tool), *self.global_args, *args]

    def __call__(self, *args: str, tool: str = "buildah", timeout: float = 600) -> str:
        result = subprocess.run(self.command(tool, *args), capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{tool} {' '.join(args[:3])}: " + result.stdout[-4000:] + result.stderr[-4000:]
        return result.stdout


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Buildah, str]]:
    """A working container of the image built from the Containerfile, and the image's config."""
    storage = tmp_path_factory.mktemp("containers")
    buildah = Buildah(storage)
    try:
        buildah("import", str(base_rootfs()), BASE_IMAGE, tool="podman")
        context = _context(tmp_path_factory.mktemp("context"))
        buildah("bud", "--isolation", "chroot", "--layers=false", "--build-arg", f"BASE={BASE_IMAGE}",
                "--build-arg", "WHEELHOUSE=wheelhouse", "--build-arg", f"VERSION={mlwarden.__version__}",
                "-t", IMAGE, "-f", str(context / "Containerfile"), str(context))
        name = buildah("from", "--name", "mlwarden-test", IMAGE).strip()
        yield buildah, name
    finally:
        subprocess.run(buildah.command("buildah", "rm", "--all"), capture_output=True)
        subprocess.run(buildah.command("buildah", "rmi", "--all", "--force"), capture_output=True)
        shutil.rmtree(storage, ignore_errors=True)


def test_image_runs_mlwarden_as_a_non_root_user_and_carries_oci_labels(container: tuple[Buildah, str]) -> None:
    buildah, _ = container
    config = json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]
    assert config["Entrypoint"] == ["mlwarden"]
    assert config["User"] == "10001:10001"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == mlwarden.__version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.title"] == "mlwarden"


def _inside(buildah: Buildah, name: str, script: str, out: Path) -> str:
    """What ``script`` prints inside the container, passed through a file in a bind-mounted
    directory: buildah's own copy of a short-lived process' stdout is not reliable under load."""
    out.mkdir(exist_ok=True)
    out.chmod(0o777)  # the image's user writes here
    buildah("run", "--isolation", "chroot", "--volume", f"{out}:/out", name, "--", "sh", "-c", f"({script}) > /out/result 2>&1")
    return (out / "result").read_text()


def test_image_has_no_compiler_and_no_pip(container: tuple[Buildah, str], tmp_path: Path) -> None:
    buildah, name = container
    assert _inside(buildah, name, "id -u", tmp_path / "uid") == "10001\n"
    found = _inside(buildah, name, "for t in cc gcc c++ g++ clang make pip pip3; do command -v $t; done; "
                                    "ls /opt/mlwarden/bin/ | grep pip; echo end", tmp_path / "tools")
    assert found == "end\n"
    assert _inside(buildah, name, "mlwarden --version", tmp_path / "version") == f"mlwarden {mlwarden.__version__}\n"


def _metrics(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return ""


@contextlib.contextmanager
def _exporter_in_image(buildah: Buildah, name: str, log_path: Path, *args: str, run_options: tuple[str, ...] = ()) -> Iterator[str]:
    """``mlwarden exporter --gpu-backend simulated ARGS`` running inside the image (``buildah run
    RUN_OPTIONS``: volumes, user); yields its /metrics URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log = log_path.open("w")
    # chroot isolation shares the host's network: the exporter listens on this machine's loopback.
    process = subprocess.Popen(
        buildah.command("buildah", "run", "--isolation", "chroot", *run_options, name, "--", "timeout", "300",
                        "mlwarden", "exporter", "--gpu-backend", "simulated", "--listen-address", f"127.0.0.1:{port}",
                        "--interval", "0.5", *args),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _kill_left_behind(f"127.0.0.1:{port}")
        log.close()
    # buildah's chroot run starts the command in a session of its own, so signalling buildah's
    # group does not reach it: without the sweep above, every run left an exporter behind.
    assert wait_until(lambda: _metrics(url) == "", 30, "the exporter to be gone")


def test_exporter_inside_the_image_serves_metrics(container: tuple[Buildah, str], tmp_path: Path) -> None:
    buildah, name = container
    with _exporter_in_image(buildah, name, tmp_path / "exporter.log") as url:
        body = wait_until(lambda: (text := _metrics(url)) and "mlwarden_gpu_up" in text and text,
                          60, "the exporter in the image to serve GPU metrics")
        assert re.search(r'^mlwarden_gpu_up\{.*gpu="0".*\} 1\.0$', body, re.M), body[:2000]
        assert "mlwarden_exporter_build_info" in body


def test_exporter_inside_the_image_attributes_gpus_to_pods_through_the_kubelet_socket(
    container: tuple[Buildah, str], tmp_path: Path, kubelet: tuple[Path, dict[str, bytes]],
) -> None:
    """What overlays/pod-attribution sets up: the kubelet's socket folder mounted, the exporter run
    as root (the socket accepts only root), grpcio in the image."""
    buildah, name = container
    socket_path, answer = kubelet
    answer["body"] = pod("vision", "from-kubelet", {"trainer": {"nvidia.com/gpu": [SIMULATED_GPU_1]}})
    with _exporter_in_image(buildah, name, tmp_path / "exporter.log", "--pod-resources-socket", "/kubelet/kubelet.sock",
                            run_options=("--volume", f"{socket_path.parent}:/kubelet:ro", "--user", "0:0")) as url:
        wanted = re.compile(r'^mlwarden_gpu_allocation_info\{[^}]*gpu="1"[^}]*namespace="vision",pod="from-kubelet"', re.M)
        assert wait_until(lambda: wanted.search(_metrics(url)), 60, "a GPU attributed to the kubelet's pod"), \
            (tmp_path / "exporter.log").read_text()[-2000:]


def _kill_left_behind(marker: str) -> None:
    """SIGKILL every `mlwarden exporter` whose command line names ``marker`` (its unique listen address)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if marker.encode() in argv and b"exporter" in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
