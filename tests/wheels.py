"""Tiny wheels made in the test, so code-environment tests never need a package index.

A wheel is a zip with the package's files and a ``.dist-info`` folder (METADATA, WHEEL,
RECORD); installers check RECORD's hashes, so they are real.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()) \
        .rstrip(b"=").decode()


def _entry(member: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed time, so one wheel made twice has one hash."""
    info = zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def make_wheel(dest: Path, name: str, version: str, files: dict[str, str] | None = None,
               *, requires: list[str] | None = None) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``dest`` and return its path.

    ``files`` maps paths inside the wheel to their text; by default one module,
    ``<name>/__init__.py``, that sets ``VERSION`` to ``version``.  ``requires`` become
    ``Requires-Dist`` lines.  The same arguments make the same bytes (fixed zip times),
    so a wheel made twice has one SHA-256."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = re.sub(r"[-_.]+", "_", name)
    module = dist.lower()
    files = files if files is not None else {f"{module}/__init__.py": f"VERSION = {version!r}\n"}
    info = f"{dist}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires or [])
    contents = {**files,
                f"{info}/METADATA": meta,
                f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: shipyard-tests\n"
                                 "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for member, text in contents.items():
            data = text.encode()
            z.writestr(_entry(member), data)
            record.append(f"{member},{_record_hash(data)},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(_entry(f"{info}/RECORD"), "\n".join(record) + "\n")
    return path
