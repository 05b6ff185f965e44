"""The pretrained files of the detection and transformation models: where each
comes from in the package registries, its hash, and the fetch step that puts
them in the weights directory (`python -m inference.weights fetch`, run by
`make weights` before the tests and the demo).

The files are taken out of two registry packages, never installed from them:
- the npm package @mediapipe/objectron 0.4.1675468480: its packed assets hold
  the Open Images label map and the SSD MobileNetV2 detector (Apache-2.0);
- the PyPI wheel mediapipe 0.10.21 (`pip download --no-deps`, so none of its
  pins reach the environment): BlazeFace and selfie segmentation (Apache-2.0).
Each archive and each file is checked against a pinned sha256; loading checks
the file again, so a damaged or foreign file is one line naming the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.settings import option

from .errors import ModelUnavailable

log = logging.getLogger("inference")

FETCH_FIX = "run `make weights` (or: python -m inference.weights fetch)"
DOWNLOAD_TIMEOUT = 120.0


@dataclass(frozen=True)
class WeightsSettings:
    """Where the fetched model files live (shared by serve, detect, transform and fetch)."""

    weights_dir: str | None = option(None, group="Model", metavar="DIR",
                                     help="directory of the detection and transformation model files that "
                                          "`python -m inference.weights fetch` fills; unset: "
                                          "~/.cache/edge-inference/weights")

    def path(self) -> Path:
        if self.weights_dir:
            return Path(self.weights_dir)
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "edge-inference" / "weights"


@dataclass(frozen=True)
class Archive:
    """A registry package file the model files are cut out of."""

    registry: str  # "npm" or "pypi"
    package: str
    version: str
    filename: str
    sha256: str


OBJECTRON = Archive("npm", "@mediapipe/objectron", "0.4.1675468480", "objectron-0.4.1675468480.tgz",
                    "fc3e37b326b05e8f596099c90b3e0931b05a56cd3160b9ac450b621794bac94c")
# One fixed wheel (the .tflite files are the same in every platform's wheel),
# so the fetch is the same bytes whatever Python runs it.
MEDIAPIPE = Archive("pypi", "mediapipe", "0.10.21", "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl",
                    "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3")


@dataclass(frozen=True)
class WeightFile:
    name: str  # file name in the weights directory
    sha256: str
    archive: Archive
    member: str  # path inside the archive
    start: int = 0  # byte range of the member that is this file
    end: int | None = None
    licence: str = "Apache-2.0"


SSD_DATA = "package/objectron_solution_packed_assets.data"
FILES = {
    "ssd-mobilenet-v2.tflite": WeightFile(
        "ssd-mobilenet-v2.tflite", "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6",
        OBJECTRON, SSD_DATA, 184, 9_987_912),
    "ssd-mobilenet-v2.labels.txt": WeightFile(
        "ssd-mobilenet-v2.labels.txt", "c148336a65f673013609a923fdcbdeec0f49df935045029c3746a3828a0e80e0",
        OBJECTRON, SSD_DATA, 0, 184),
    "face_detection_short_range.tflite": WeightFile(
        "face_detection_short_range.tflite", "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        MEDIAPIPE, "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
    "selfie_segmentation.tflite": WeightFile(
        "selfie_segmentation.tflite", "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        MEDIAPIPE, "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"),
}
NOTICE = """These files are cut, unchanged, out of Google's MediaPipe packages (Apache License 2.0,
https://www.apache.org/licenses/LICENSE-2.0; LICENSE beside this file is the wheel's copy):
  ssd-mobilenet-v2.tflite, ssd-mobilenet-v2.labels.txt: npm @mediapipe/objectron 0.4.1675468480,
      package/objectron_solution_packed_assets.data (bytes 184-9987912 and 0-184)
  face_detection_short_range.tflite, selfie_segmentation.tflite: PyPI mediapipe 0.10.21,
      mediapipe/modules/...
Written by `python -m inference.weights fetch`; each file's sha256 is pinned in inference/weights.py.
"""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate(name: str, directory: Path) -> Path:
    """The path of a pinned file, checked against its hash; a missing or
    different file raises ModelUnavailable naming the fix."""
    spec = FILES[name]
    path = directory / name
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; {FETCH_FIX}, or set --weights-dir to where it is")
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise ModelUnavailable(f"{path} is damaged or not the pinned file (sha256 {digest[:12]}..., expected "
                               f"{spec.sha256[:12]}...); delete it and {FETCH_FIX}")
    return path


def missing(directory: Path) -> list[str]:
    """Names of the pinned files that are absent or differ from their hash."""
    return [n for n, f in FILES.items() if not ((directory / n).is_file() and sha256_of(directory / n) == f.sha256)]


# ------------------------------------------------------------------ fetch

def _download_npm(archive: Archive, into: Path) -> Path:
    """The package's tarball with npm's own client (`npm pack`), from whatever
    registry npm is configured to use; nothing is installed."""
    npm = shutil.which("npm")
    if npm is None:
        raise ModelUnavailable(f"fetching {archive.package} needs npm (Node.js): install it (Debian: apt-get "
                               "install npm), or put the model files in --weights-dir yourself")
    spec = f"{archive.package}@{archive.version}"
    log.info("downloading %s with npm pack (not installed, only unpacked)", spec)
    try:
        done = subprocess.run([npm, "pack", spec, "--pack-destination", str(into), "--silent"], capture_output=True,
                              text=True, timeout=DOWNLOAD_TIMEOUT * 5, check=False, cwd=into)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"npm pack {spec} failed ({exc})") from None
    # npm prints the tarball's name (scope-name-version.tgz) as its last line.
    name = (done.stdout.strip().splitlines() or [""])[-1].strip()
    target = into / name
    if done.returncode != 0 or not name or not target.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailable(f"npm pack {spec} failed: {tail}")
    return target


def _download_pypi(archive: Archive, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
           f"{archive.package}=={archive.version}", "--dest", str(into)]
    log.info("downloading %s %s with pip (--no-deps: not installed, only unpacked)", archive.package, archive.version)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT * 5, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"pip download of {archive.package}=={archive.version} failed ({exc})") from None
    target = into / archive.filename
    if done.returncode != 0 or not target.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailable(f"pip download of {archive.package}=={archive.version} failed: {tail}")
    return target


def _member(archive: Archive, path: Path, member: str) -> bytes:
    if archive.registry == "npm":
        with tarfile.open(path, "r:gz") as t:
            f = t.extractfile(member)
            if f is None:
                raise ModelUnavailable(f"{archive.filename} has no file {member}")
            return f.read()
    with zipfile.ZipFile(path) as z:
        return z.read(member)


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the files are public and may serve other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(directory: Path) -> list[str]:
    """Put every pinned file in `directory`, downloading only the archives
    that hold a missing one. Returns the names written."""
    todo = missing(directory)
    if not todo:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        for archive in (OBJECTRON, MEDIAPIPE):
            wanted = [FILES[n] for n in todo if FILES[n].archive == archive]
            if not wanted:
                continue
            get = _download_npm if archive.registry == "npm" else _download_pypi
            path = get(archive, Path(tmp))
            digest = sha256_of(path)
            if digest != archive.sha256:
                raise ModelUnavailable(f"{archive.filename} from the {archive.registry} registry has sha256 "
                                       f"{digest[:12]}..., pinned {archive.sha256[:12]}...; refusing it")
            cache: dict[str, bytes] = {}
            for spec in wanted:
                if spec.member not in cache:
                    cache[spec.member] = _member(archive, path, spec.member)
                data = cache[spec.member][spec.start:spec.end]
                if hashlib.sha256(data).hexdigest() != spec.sha256:
                    raise ModelUnavailable(f"{spec.name} cut out of {archive.filename} does not match its pin")
                _write(directory / spec.name, data)
                written.append(spec.name)
            if archive.registry == "pypi":
                with zipfile.ZipFile(path) as z:
                    licence = z.read(f"{archive.package}-{archive.version}.dist-info/LICENSE")
                _write(directory / "LICENSE", licence)
    _write(directory / "NOTICE", NOTICE.encode())
    return written


def main(argv: list[str] | None = None) -> int:
    from runtime import settings
    from runtime.cli import StartupError, run_main, setup_logging
    p = argparse.ArgumentParser(prog="python -m inference.weights",
                                description="Fetch the detection and transformation model files from the npm and "
                                            "PyPI registries (nothing is installed) and check their hashes.")
    p.add_argument("command", choices=("fetch", "check"), help="fetch: download what is missing; check: only verify")
    settings.add_arguments(p, WeightsSettings, "INFER")
    a = p.parse_args(argv)

    def body() -> int:
        try:
            ws = settings.resolve(WeightsSettings, "INFER", a)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        setup_logging("info", ())
        directory = ws.path()
        if a.command == "check":
            bad = missing(directory)
            if bad:
                raise StartupError(f"{', '.join(bad)} missing or damaged in {directory}; {FETCH_FIX}")
            print(f"{directory}: all {len(FILES)} files present and match their sha256")
            return 0
        try:
            written = fetch(directory)
        except ModelUnavailable as exc:
            raise StartupError(str(exc)) from None
        print(f"{directory}: {'wrote ' + ', '.join(written) if written else 'already complete'}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
