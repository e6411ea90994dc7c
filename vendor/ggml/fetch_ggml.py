#!/usr/bin/env python3
"""Fetch the pinned ggml source into vendor/ggml/ggml/.

The pin (vendor/ggml/PIN) names a PyPI sdist and its sha256. This script downloads that
sdist *by name* with pip (or takes a local copy from --sdist / $DSV4_GGML_SDIST), verifies the
checksum, extracts only its ggml subtree, and applies our patches (vendor/ggml/patches/*.patch,
in name order). A stamp file records what was extracted, so a changed pin or patch set
re-extracts. Exit status 0 on success; on failure a one-paragraph message on stderr that says
what went wrong and how to fix it (CMake shows it verbatim).

Usage: python vendor/ggml/fetch_ggml.py [--sdist PATH] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "PIN"
DEST = HERE / "ggml"
DOWNLOAD_DIR = HERE / ".download"
PATCH_DIR = HERE / "patches"
STAMP = DEST / ".dsv4-pin-stamp"


class FetchError(Exception):
    pass


def read_pin() -> dict[str, str]:
    pin: dict[str, str] = {}
    for line in PIN_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        pin[key.strip()] = value.strip()
    for key in ("package", "version", "sdist", "sha256", "subtree"):
        if key not in pin:
            raise FetchError(f"{PIN_FILE}: missing '{key} = ...'")
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(pin: dict[str, str]) -> Path:
    target = DOWNLOAD_DIR / pin["sdist"]
    if target.exists() and sha256_of(target) == pin["sha256"]:
        return target
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    spec = f"{pin['package']}=={pin['version']}"
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "--dest", str(DOWNLOAD_DIR), "--quiet"]
    # pip download of an sdist normally prepares its metadata by running the package's build
    # backend; we only need the archive, so skip that step when pip allows it.
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    print(f"dsv4-ggml: downloading {spec} (sdist) with pip ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not target.exists():
        # --no-build-isolation metadata preparation can fail for want of the package's
        # build backend; the archive is usually saved before that, but retry with isolation.
        cmd.remove("--no-build-isolation")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not target.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise FetchError(
            f"could not download {spec} with pip (exit {proc.returncode}).\n{tail}\n"
            f"Without network access, download {pin['sdist']} elsewhere and pass it with "
            f"DSV4_GGML_SDIST=/path/to/{pin['sdist']}.")
    return target


def verify(path: Path, pin: dict[str, str]) -> None:
    digest = sha256_of(path)
    if digest != pin["sha256"]:
        raise FetchError(f"{path}: sha256 {digest} does not match the pin {pin['sha256']} "
                         f"({PIN_FILE}). Refusing to build against an unverified ggml.")


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch")) if PATCH_DIR.is_dir() else []


def stamp_text(pin: dict[str, str]) -> str:
    lines = [f"{pin['package']}=={pin['version']} sha256={pin['sha256']} subtree={pin['subtree']}"]
    lines += [f"patch {p.name} sha256={sha256_of(p)}" for p in patches()]
    return "\n".join(lines) + "\n"


def extract(sdist: Path, pin: dict[str, str]) -> None:
    prefix = f"{sdist.name[:-len('.tar.gz')]}/{pin['subtree'].strip('/')}/"
    tmp = Path(tempfile.mkdtemp(prefix=".ggml-", dir=HERE))
    try:
        count = 0
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                    continue
                rel = member.name[len(prefix):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    continue
                out = tmp / rel
                if member.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.chmod(0o755 if member.mode & 0o111 else 0o644)
                count += 1
        if count == 0 or not (tmp / "CMakeLists.txt").exists():
            raise FetchError(f"{sdist} has no {pin['subtree']}/CMakeLists.txt")
        for patch in patches():
            proc = subprocess.run(["patch", "-p1", "--forward", "--silent", "-i", str(patch)],
                                  cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise FetchError(f"patch {patch.name} does not apply:\n{proc.stdout}{proc.stderr}")
        if DEST.exists():
            shutil.rmtree(DEST)
        tmp.rename(DEST)
        STAMP.write_text(stamp_text(pin))
        print(f"dsv4-ggml: extracted {count} files of ggml {pin.get('ggml_version', '')} "
              f"into {DEST}", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help="use this local sdist instead of downloading it")
    ap.add_argument("--force", action="store_true", help="re-extract even if up to date")
    args = ap.parse_args()
    try:
        pin = read_pin()
        if not args.force and STAMP.exists() and STAMP.read_text() == stamp_text(pin):
            return 0
        local = args.sdist or os.environ.get("DSV4_GGML_SDIST")
        sdist = Path(local) if local else download_sdist(pin)
        if not sdist.exists():
            raise FetchError(f"{sdist}: no such file")
        verify(sdist, pin)
        extract(sdist, pin)
        return 0
    except FetchError as e:
        print(f"dsv4-ggml: cannot fetch the pinned ggml: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
