"""The docker side of the CI matrix (``ci/matrix.py``): the engine, the clean images and the ccache volume.

Images are built from nothing but Debian's archive, as no image registry is reachable: ``debootstrap
--variant=minbase bookworm`` makes a root file system, ``docker import`` turns it into the base image, and
one Dockerfile per backend adds that backend's toolchain and the project's Python dependencies on top. Each
toolchain image is tagged with a digest of its Dockerfile and the files copied into it, so a re-run finds it
and builds nothing; a changed Dockerfile builds a new tag from docker's layer cache. The ccache volume
outlives every container, so a re-run compiles from the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.paths import ensure_dir

log = logging.getLogger("ci.matrix")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_IMAGE = f"velollm-ci/base:{SUITE}"
CCACHE_VOLUME = "velollm-ci-ccache"
CCACHE_MOUNT = "/ccache"
VENV = "/opt/venv"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_START_WAIT_S = 60
ENGINE_HOWTO = (
    "install and start one (Debian/Ubuntu, as root: `apt-get install -y docker.io && dockerd &`), then run again"
)
# What every cell needs to run velollm-patch's build: the compilers, cmake/ninja/ccache, git (patches are
# applied with `git apply`), binutils (readelf, for the manifest) and Python for the product itself.
COMMON_PACKAGES = ("python3", "python3-venv", "cmake", "ninja-build", "g++", "ccache", "git", "binutils",
                   "ca-certificates")
# The Vulkan toolchain and the llvmpipe device come from the script CI machines run (headers from trixie).
VULKAN_SCRIPT = REPO_ROOT / "ci" / "install-vulkan-toolchain.sh"
# Where the host's CA bundle goes in the images: pip must trust whatever the host's package mirror presents.
HOST_CA = "/etc/ssl/certs/velollm-host-ca.crt"


def connect() -> Any:
    """A docker client for a running engine; starts ``dockerd`` (and says so) when it is installed but not
    running. Raises a one-line :class:`VelollmError` saying how to get an engine when there is none."""
    try:
        import docker  # the `ci` extra; only the matrix needs it
    except ImportError as exc:
        raise VelollmError(
            "the docker Python SDK is not installed: pip install 'velollm-patch[ci]' (or `pip install docker`)"
        ) from exc
    try:
        client = docker.from_env()  # asks the engine for its API version: fails when none answers
        client.ping()
        return client
    except docker.errors.DockerException:
        pass
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise VelollmError(f"no docker engine is running here and dockerd is not installed: {ENGINE_HOWTO}")
    if os.geteuid() != 0:
        raise VelollmError(f"the docker engine is not running and only root can start it here: {ENGINE_HOWTO}")
    log_file = ensure_dir(Path(tempfile.gettempdir()) / "velollm-ci") / "dockerd.log"
    print(f"the docker engine is not running: starting {dockerd} (log: {log_file})", flush=True)
    # A daemon outlives this command (the next run reuses it), so it is started detached rather than
    # through proc.run, which waits for what it runs.
    with log_file.open("ab") as handle:
        subprocess.Popen([dockerd], stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + ENGINE_START_WAIT_S
    while time.monotonic() < deadline:
        try:
            client = docker.from_env()
            client.ping()
            return client
        except docker.errors.DockerException:
            time.sleep(1)
    raise VelollmError(f"dockerd did not answer within {ENGINE_START_WAIT_S} s (see {log_file}): {ENGINE_HOWTO}")


def ensure_base_image(client: Any) -> str:
    """The minbase Debian image, made with debootstrap and ``docker import`` when it is not there yet."""
    if _has_image(client, BASE_IMAGE):
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        raise VelollmError("the base image is made with debootstrap, which is not installed: "
                           "apt-get install debootstrap")
    print(f"making {BASE_IMAGE} with debootstrap --variant=minbase {SUITE} (about a minute)", flush=True)
    with tempfile.TemporaryDirectory(prefix="velollm-ci-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc.run(["debootstrap", "--variant=minbase", SUITE, rootfs, MIRROR], timeout=1800,
                 what=f"debootstrap {SUITE}")
        tarball = Path(tmp) / "rootfs.tar"
        proc.run(["tar", "-C", rootfs, "-cf", tarball, "."], timeout=600, what="tar of the root file system")
        repository, tag = BASE_IMAGE.split(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    if not _has_image(client, BASE_IMAGE):
        raise VelollmError(f"docker import did not produce {BASE_IMAGE}")
    return BASE_IMAGE


@dataclass(frozen=True)
class ImageRecipe:
    backend: str
    dockerfile: str
    files: dict[str, bytes]  # build context besides the Dockerfile

    @property
    def tag(self) -> str:
        digest = hashlib.sha256(self.dockerfile.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        return f"velollm-ci/{self.backend}:{digest.hexdigest()[:12]}"


def python_requirements() -> list[str]:
    """The product's runtime dependencies, from pyproject.toml (the repository itself is mounted, not installed)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def recipe(backend: str) -> ImageRecipe:
    """The Dockerfile for one backend's image: the common toolchain, the Python dependencies in a venv, and
    the backend's own packages. CUDA's toolkit and cuBLAS are mounted from the host at run time (Debian 12
    has no CUDA 13), so the cuda image is the common one."""
    files = {"host-ca.crt": _host_ca_bundle()}
    requirements = " ".join(f"'{r}'" for r in python_requirements())
    lines = [
        f"FROM {BASE_IMAGE}",
        "ENV DEBIAN_FRONTEND=noninteractive",
        f"RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends {' '.join(COMMON_PACKAGES)} "
        ">/dev/null && rm -rf /var/lib/apt/lists/*",
        f"COPY host-ca.crt {HOST_CA}",
        f"RUN python3 -m venv {VENV} && {VENV}/bin/pip install -q --cert {HOST_CA} --disable-pip-version-check "
        f"{requirements}",
    ]
    if backend == "vulkan":
        files["install-vulkan-toolchain.sh"] = VULKAN_SCRIPT.read_bytes()
        lines += [
            "COPY install-vulkan-toolchain.sh /tmp/install-vulkan-toolchain.sh",
            "RUN bash /tmp/install-vulkan-toolchain.sh && rm -rf /var/lib/apt/lists/* /tmp/install-vulkan-toolchain.sh",
        ]
    lines.append(f"ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return ImageRecipe(backend=backend, dockerfile="\n".join(lines) + "\n", files=files)


def ensure_backend_image(client: Any, backend: str) -> str:
    """The backend's toolchain image, built (network: the host's, for its apt and pip mirrors) when missing."""
    wanted = recipe(backend)
    if _has_image(client, wanted.tag):
        return wanted.tag
    ensure_base_image(client)
    print(f"building {wanted.tag} (apt and pip through the host's network; cached in docker's layers)", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"velollm-ci-{backend}-") as tmp:
        context = Path(tmp)
        (context / "Dockerfile").write_text(wanted.dockerfile)
        for name, data in wanted.files.items():
            (context / name).write_bytes(data)
        try:
            client.images.build(path=str(context), tag=wanted.tag, network_mode="host", rm=True, forcerm=True)
        except Exception as exc:  # docker.errors.BuildError carries the log; the SDK is imported lazily
            build_log = getattr(exc, "build_log", None) or []
            lines = [str(chunk.get("stream") or chunk.get("error") or "").strip() for chunk in build_log]
            tail = "; ".join(line for line in lines if line)[-600:]
            raise VelollmError(f"building the {backend} image failed: {exc}; {tail}") from exc
    return wanted.tag


def ensure_ccache_volume(client: Any, image: str, seed: Path | None) -> str:
    """The ccache volume shared by every cell and run; a new one is seeded from the host's ccache, whose
    entries hit when the compiler is the same Debian package (ccache checks the compiler's size and mtime)."""
    import docker

    try:
        client.volumes.get(CCACHE_VOLUME)
        return CCACHE_VOLUME
    except docker.errors.NotFound:
        pass
    client.volumes.create(CCACHE_VOLUME)
    if seed is not None and seed.is_dir():
        print(f"seeding the ccache volume {CCACHE_VOLUME} from {seed}", flush=True)
        client.containers.run(
            image, ["cp", "-a", "/seed/.", CCACHE_MOUNT], remove=True, network_mode="none",
            volumes={str(seed): {"bind": "/seed", "mode": "ro"}, CCACHE_VOLUME: {"bind": CCACHE_MOUNT, "mode": "rw"}},
        )
    return CCACHE_VOLUME


def host_ccache_dir() -> Path | None:
    """Where the host's ccache keeps its cache (velollm's builds use the user's ccache), if it has one."""
    if shutil.which("ccache") is None:
        return None
    result = proc.run(["ccache", "--get-config", "cache_dir"], check=False, timeout=30)
    path = Path(result.output.strip())
    return path if result.returncode == 0 and path.is_dir() else None


def _host_ca_bundle() -> bytes:
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    return bundle.read_bytes() if bundle.is_file() else b""


def _has_image(client: Any, name: str) -> bool:
    import docker

    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False
