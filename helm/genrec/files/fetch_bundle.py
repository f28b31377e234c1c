"""Init container: download a genrec bundle tarball, verify its sha256, unpack it.

Environment: BUNDLE_URL (http(s):// or file://), BUNDLE_SHA256 (64 hex digits),
BUNDLE_DIR (target directory, normally an emptyDir mounted where the bundle is served).
The tarball holds the bundle directory (manifest.json at its root, or inside one
top-level folder). Nothing is unpacked unless the checksum matches; members that would
land outside BUNDLE_DIR, links and device files are refused (tarfile's "data" filter).
The gateway verifies every file's own checksum from manifest.json when it loads.
Standard library only: it runs in the gateway image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

CHUNK = 1 << 20
ATTEMPTS = 3


def fail(message: str) -> None:
    print(f"fetch-bundle: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def download(url: str, dest: Path) -> str:
    """Streams `url` into `dest` and returns its sha256; retries transient failures."""
    for attempt in range(1, ATTEMPTS + 1):
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()
        except OSError as e:  # URLError and HTTPError are OSErrors
            if attempt == ATTEMPTS:
                fail(f"download failed after {ATTEMPTS} attempts: {e}")
            print(f"fetch-bundle: attempt {attempt} failed ({e}); retrying", flush=True)
            time.sleep(2 * attempt)
    raise AssertionError("unreachable")


def main() -> None:
    url = os.environ.get("BUNDLE_URL", "").strip()
    expected = os.environ.get("BUNDLE_SHA256", "").strip().lower()
    target = Path(os.environ.get("BUNDLE_DIR", "/bundle"))
    if not url:
        fail("BUNDLE_URL is not set")
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        fail("BUNDLE_SHA256 must be 64 hex digits")
    target.mkdir(parents=True, exist_ok=True)
    marker = target / ".sha256"
    fetched = marker.read_text().strip() if marker.is_file() else ""
    if fetched == expected and (target / "manifest.json").is_file():  # a restarted pod
        print(f"fetch-bundle: {target} already holds {expected[:12]}", flush=True)
        return
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "bundle.tar.gz"
        started = time.monotonic()
        actual = download(url, archive)
        if actual != expected:
            fail(f"sha256 mismatch: expected {expected}, got {actual}; refusing to unpack")
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
        except (tarfile.TarError, OSError) as e:
            fail(f"cannot unpack the tarball: {e}")
        root = unpacked
        if not (root / "manifest.json").is_file():
            entries = [p for p in unpacked.iterdir() if not p.name.startswith(".")]
            if len(entries) == 1 and (entries[0] / "manifest.json").is_file():
                root = entries[0]
            else:
                fail("no manifest.json at the tarball's root or in its single top folder")
        for old in target.iterdir():
            if old.name == Path(tmp).name:
                continue
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        for item in root.iterdir():
            shutil.move(str(item), target / item.name)
        (target / ".sha256").write_text(expected + "\n")
        size = archive.stat().st_size
    print(
        f"fetch-bundle: {size / 2**20:.1f} MiB, sha256 {expected[:12]} verified, unpacked into "
        f"{target} in {time.monotonic() - started:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
