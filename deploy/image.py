#!/usr/bin/env python3
"""Build deploy/Dockerfile with Podman or Docker, whichever is there (`make image`).

    python3 deploy/image.py [--tag imagebatch:local] [--no-build-essential]

Owns the choice of engine, the flags a host needs to build and run containers, and the base
image. The base is ``PYTHON_IMAGE`` when set, else ``python:3.11-slim``; where that cannot be
pulled (a host that reaches package registries but no container registry), it is a Debian
bookworm root filesystem made with ``debootstrap`` from Debian's packages and imported as
``localhost/imagebatch-base:bookworm-<hash>``. That base is cached twice, keyed by a hash of its
recipe (suite, mirror, package list): as the tagged image in the engine's store, and as a tarball
under ``$XDG_CACHE_HOME/imagebatch`` that survives an image prune. A file lock keeps two builds
on one host from making it at once.

Host quirks handled here so nobody works around them by hand:

- Podman runs containers with ``runc`` when it is installed: ``crun`` (Debian's default) fails
  to create containers on hosts with a hybrid cgroup v1/v2 hierarchy, runc works on both.
- Podman gets a ``containers.conf`` (through ``CONTAINERS_CONF``, unless the caller set one)
  with ``default_ulimits = []``: Podman's default raises ``RLIMIT_NOFILE`` above the hard limit
  of a process that is not allowed to, and every container then fails to start.
- Where the host has a CA bundle, Podman mounts ``/etc/ssl/certs`` into the build's RUN steps and
  pip is pointed at it (``CA_BUNDLE`` build argument), so a build works where TLS to the package
  index is intercepted by a proxy the host trusts.

Failure semantics: every engine call's error ends the script with that engine's exit status and
output; nothing is retried. A base image that cannot be pulled or made is an error naming what
is missing (debootstrap, root).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
IGNOREFILE = REPO / "deploy" / "Dockerfile.dockerignore"
DEFAULT_TAG = "imagebatch:local"
DEFAULT_PYTHON_IMAGE = "python:3.11-slim"

# The Debian base: bookworm's python3 is 3.11, the version python:3.11-slim carries.
# python-is-python3 gives the `python` the Dockerfile calls; python3-venv brings ensurepip.
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
BASE_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_REPO = "localhost/imagebatch-base"
# Bumped when the recipe below changes in a way the hash of its inputs does not show.
BASE_RECIPE_VERSION = 1
# An imported root filesystem has no image config: give it python:3.11-slim's PATH and locale.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
)

HOST_CA_DIR = Path("/etc/ssl/certs")
HOST_CA_BUNDLE = HOST_CA_DIR / "ca-certificates.crt"

CONTAINERS_CONF = """\
# Written by deploy/image.py for Podman on this host.
[containers]
# Podman's default raises RLIMIT_NOFILE, which fails where the hard limit cannot be raised;
# an empty list keeps the limits podman itself runs with.
default_ulimits = []
"""


def log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(root) / "imagebatch"
    path.mkdir(parents=True, exist_ok=True)
    return path


class EngineError(RuntimeError):
    """An engine command failed; the message carries its output."""


@dataclass
class Engine:
    """A container engine CLI with the global flags and environment this host needs."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def run(
        self,
        *args: str,
        check: bool = True,
        capture: bool = True,
        timeout: float | None = None,
        stdin: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(*args),
            env=self.environ(),
            text=True,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise EngineError(
                f"{' '.join(self.command(*args))} exited with {proc.returncode}:\n"
                f"{(proc.stdout or '')[-6000:]}"
            )
        return proc

    def usable(self) -> tuple[bool, str]:
        """Whether this engine can run containers here, and why not."""
        try:
            proc = self.run("info", check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"{self.name} info: {exc}"
        if proc.returncode != 0:
            return False, f"{self.name} info failed: {(proc.stdout or '').strip()[-500:]}"
        return True, ""

    def image_exists(self, ref: str) -> bool:
        if self.name == "podman":
            return self.run("image", "exists", ref, check=False).returncode == 0
        return self.run("image", "inspect", ref, check=False).returncode == 0


def podman_conf() -> dict[str, str]:
    if os.environ.get("CONTAINERS_CONF"):
        return {}
    conf = cache_dir() / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        tmp = conf.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(CONTAINERS_CONF)
        tmp.replace(conf)
    return {"CONTAINERS_CONF": str(conf)}


def find_engine(preferred: str | None = None) -> Engine | None:
    """Podman if it is installed, else Docker; ``CONTAINER_ENGINE`` or ``preferred`` picks one."""
    wanted = preferred or os.environ.get("CONTAINER_ENGINE") or ""
    for name in [wanted] if wanted else ["podman", "docker"]:
        path = shutil.which(name)
        if not path:
            continue
        if name == "podman":
            argv = [path]
            if shutil.which("runc"):
                argv += ["--runtime", "runc"]
            return Engine("podman", argv, podman_conf())
        return Engine(name, [path], {"DOCKER_BUILDKIT": "1"})
    return None


# --- the base image ----------------------------------------------------------------------------


def base_recipe() -> dict[str, object]:
    return {
        "suite": BASE_SUITE,
        "variant": BASE_VARIANT,
        "packages": sorted(BASE_PACKAGES),
        "mirror": BASE_MIRROR,
        "changes": list(BASE_CHANGES),
        "version": BASE_RECIPE_VERSION,
    }


def base_tag() -> str:
    digest = hashlib.sha256(json.dumps(base_recipe(), sort_keys=True).encode()).hexdigest()
    return f"{BASE_REPO}:{BASE_SUITE}-{digest[:12]}"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def debootstrap_rootfs(target: Path) -> None:
    debootstrap = shutil.which("debootstrap")
    if not debootstrap:
        raise SystemExit(
            f"{DEFAULT_PYTHON_IMAGE} cannot be pulled and debootstrap is missing: install Debian's "
            "debootstrap package, or set PYTHON_IMAGE to a Python 3.11 image you have"
        )
    if os.geteuid() != 0:
        raise SystemExit(
            f"{DEFAULT_PYTHON_IMAGE} cannot be pulled, and making a Debian base with debootstrap "
            "needs root; run as root or set PYTHON_IMAGE to a Python 3.11 image you have"
        )
    args = [
        debootstrap,
        f"--variant={BASE_VARIANT}",
        "--include=" + ",".join(BASE_PACKAGES),
        BASE_SUITE,
        str(target),
        BASE_MIRROR,
    ]
    log(" ".join(args))
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    # What apt downloaded and indexed is dead weight in every image built on this base.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for path in target.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def ensure_base(engine: Engine) -> str:
    """The tag of the Debian base image, made and imported unless it is cached."""
    tag = base_tag()
    cache = cache_dir()
    with locked(cache / "base.lock"):
        if engine.image_exists(tag):
            log(f"base image {tag}: cached")
            return tag
        tarball = cache / f"{tag.rsplit(':', 1)[1]}.tar"
        if not tarball.exists():
            start = time.monotonic()
            with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs-") as tmp:
                rootfs = Path(tmp) / "rootfs"
                debootstrap_rootfs(rootfs)
                partial = tarball.with_suffix(".tar.partial")
                subprocess.run(
                    ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."],
                    check=True,
                )
                partial.replace(tarball)
            log(f"base root filesystem made in {time.monotonic() - start:.0f}s: {tarball}")
        else:
            log(f"base root filesystem: cached {tarball}")
        start = time.monotonic()
        changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
        engine.run("import", *changes, str(tarball), tag, timeout=600)
        log(f"base image {tag} imported in {time.monotonic() - start:.0f}s")
    return tag


def can_pull(engine: Engine, ref: str) -> bool:
    if engine.image_exists(ref):
        return True
    try:
        return engine.run("pull", ref, check=False, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def python_image(engine: Engine) -> str:
    given = os.environ.get("PYTHON_IMAGE")
    if given:
        return given
    if can_pull(engine, DEFAULT_PYTHON_IMAGE):
        return DEFAULT_PYTHON_IMAGE
    log(f"{DEFAULT_PYTHON_IMAGE} cannot be pulled here: using a Debian {BASE_SUITE} base")
    return ensure_base(engine)


# --- the build ---------------------------------------------------------------------------------


def build_command(engine: Engine, tag: str, base: str, build_essential: bool = True) -> list[str]:
    args = [
        "build",
        "--file",
        str(DOCKERFILE),
        "--tag",
        tag,
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--build-arg",
        f"BUILD_ESSENTIAL={1 if build_essential else 0}",
    ]
    if engine.name == "podman":
        # Docker's image format keeps the HEALTHCHECK, which OCI's has no field for.
        args += ["--format", "docker", "--ignorefile", str(IGNOREFILE)]
        if HOST_CA_BUNDLE.is_file():
            args += [
                "--volume",
                f"{HOST_CA_DIR}:{HOST_CA_DIR}:ro",
                "--build-arg",
                f"CA_BUNDLE={HOST_CA_BUNDLE}",
            ]
    return engine.command(*args, str(REPO))


def build(
    engine: Engine,
    tag: str = DEFAULT_TAG,
    *,
    base: str | None = None,
    build_essential: bool = True,
    output: int | None = None,
) -> float:
    """Build the image on ``base`` (default: :func:`python_image`); return the seconds it took.

    ``output`` receives the engine's log.
    """
    base = base or python_image(engine)
    cmd = build_command(engine, tag, base, build_essential)
    log(" ".join(cmd))
    start = time.monotonic()
    proc = subprocess.run(
        cmd, env=engine.environ(), stdin=subprocess.DEVNULL, stdout=output, stderr=output
    )
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{engine.name} build exited with {proc.returncode}")
    log(f"built {tag} on {base} in {took:.0f}s")
    return took


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tag", default=os.environ.get("IMAGE", DEFAULT_TAG))
    parser.add_argument("--engine", help="podman or docker (default: podman if installed)")
    parser.add_argument(
        "--no-build-essential",
        dest="build_essential",
        action="store_false",
        help="skip the compiler in the build stage (every dependency has a wheel on x86_64)",
    )
    args = parser.parse_args(argv)
    engine = find_engine(args.engine)
    if engine is None:
        raise SystemExit("neither podman nor docker is installed")
    build(engine, args.tag, build_essential=args.build_essential)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
