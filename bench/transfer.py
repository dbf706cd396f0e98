"""Large-file transfer: ``put_file``/``get_file`` vs a plain file copy and nats-py's Object Store.

One 100 MiB file of random bytes, measured in one run on this machine, every source hot in
the page cache, uvloop in every process (as the nodes run):

* ``file copy``: ``shutil.copyfile`` to a temporary name renamed onto the destination (the
  pattern ``get_file`` follows), the baseline;
* ``put_file`` / ``get_file``: this repo's transfer module, in this process;
* ``get_file, fresh process``: a separate process that connects and receives the object,
  reporting its time and peak RSS (``VmHWM``) against the file size;
* ``nats-py put`` / ``nats-py get(writeinto)``: nats-py's ObjectStore, for reference.

Copies and gets are measured twice: onto a new destination, and over an existing one
(replacing a 100 MiB file frees its pages inside the timed step, a fixed cost that weighs
far more on the in-kernel copy).  Steps run interleaved for several rounds, each after an
``os.sync()`` so none pays for the previous step's writeback; medians are reported.

Targets: ``get_file`` >= 0.3x the file copy in both destination cases (the worse ratio
counts); the receiving process's peak RSS below the file size, and its growth during the
get (the transfer's own memory) under a quarter of the file size.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats

from bench.common import ROOT, nats_server, print_table
from nodes.runtime import transfer

SIZE = 100 << 20
TARGET = 0.3
MAX_GROWTH_FRACTION = 0.25
BUCKET = "bench"
UVLOOP = {"use_uvloop": True}
PATHS = ("copy, new dest", "copy, over existing", "put_file", "get_file, new dest",
         "get_file, over existing", "get_file, fresh process (new dest)")


def _settle() -> None:
    """Flush dirty pages so no step pays for the previous step's writeback."""
    os.sync()


def _peak_rss_kib() -> int:
    """This process image's peak RSS (VmHWM; ``ru_maxrss`` also counts the forked parent)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _mbps(seconds: float) -> float:
    return round(SIZE / seconds / 1e6, 1)


def _fresh(dest: Path) -> Path:
    dest.unlink(missing_ok=True)
    _settle()
    return dest


def _copy(src: Path, dest: Path) -> float:
    part = dest.with_name(dest.name + ".part")
    _settle()
    t0 = time.perf_counter()
    shutil.copyfile(src, part)
    os.replace(part, dest)
    return time.perf_counter() - t0


async def _timed(aw: Callable[[], Awaitable[Any]]) -> float:
    _settle()
    t0 = time.perf_counter()
    await aw()
    return time.perf_counter() - t0


async def _round(url: str, src: Path, tmp: Path, times: dict[str, list[float]]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    new, old = _fresh(tmp / "get-new.bin"), tmp / "get-old.bin"
    times["put_file"].append(await _timed(lambda: transfer.put_file(js, BUCKET, "obj", src)))
    times["get_file, new dest"].append(
        await _timed(lambda: transfer.get_file(js, BUCKET, "obj", new)))
    times["get_file, over existing"].append(
        await _timed(lambda: transfer.get_file(js, BUCKET, "obj", old)))
    await nc.close()


async def _nats_py(url: str, src: Path, dest: Path) -> dict[str, float]:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    store = await js.create_object_store("natspy")
    with src.open("rb") as f:
        t_put = await _timed(lambda: store.put("obj", f))
    with dest.open("wb") as out:
        t_get = await _timed(lambda: store.get("obj", writeinto=out))
    await js.delete_object_store("natspy")
    await nc.close()
    return {"put": t_put, "get": t_get}


def _fresh_process(url: str, dest: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.transfer", "--receive", url, str(dest)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"receiver failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 3 if quick else 7
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    rss: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sy-bench-transfer-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "src.bin"
        src.write_bytes(os.urandom(SIZE))
        for name in ("copy-old.bin", "get-old.bin"):  # the "existing" destinations
            shutil.copyfile(src, tmp / name)
        with nats_server() as server:
            for _ in range(rounds):  # interleaved, so drift hits every path alike
                times["copy, new dest"].append(_copy(src, _fresh(tmp / "copy-new.bin")))
                times["copy, over existing"].append(_copy(src, tmp / "copy-old.bin"))
                anyio.run(_round, server.url, src, tmp, times, backend_options=UVLOOP)
                rss.append(_fresh_process(server.url, _fresh(tmp / "fresh.bin")))
                times["get_file, fresh process (new dest)"].append(rss[-1]["seconds"])
            ref = anyio.run(_nats_py, server.url, src, tmp / "natspy.bin",
                            backend_options=UVLOOP)
        for name in ("get-new.bin", "get-old.bin", "fresh.bin", "natspy.bin"):
            assert (tmp / name).read_bytes() == src.read_bytes(), f"{name} differs from src"
    times["nats-py put"], times["nats-py get(writeinto), new dest"] = [ref["put"]], [ref["get"]]
    copy = {"new": _mbps(statistics.median(times["copy, new dest"])),
            "old": _mbps(statistics.median(times["copy, over existing"]))}
    paths: dict[str, dict[str, Any]] = {}
    for name, samples in times.items():
        mbps = _mbps(statistics.median(samples))
        baseline = copy["old"] if "existing" in name else copy["new"]
        paths[name] = {"mb_s": mbps, "x_copy": round(mbps / baseline, 3),
                       "rounds_mb_s": [_mbps(t) for t in samples]}
    print_table(f"transfer: {SIZE >> 20} MiB file, median of {rounds} interleaved rounds "
                "(x copy: vs the copy with the same kind of destination)",
                ["path", "MB/s", "x copy", "all rounds MB/s"],
                [(n, p["mb_s"], p["x_copy"], p["rounds_mb_s"]) for n, p in paths.items()])
    peak = max(r["maxrss_kib"] for r in rss) / 1024
    growth = max(r["maxrss_kib"] - r["baseline_kib"] for r in rss) / 1024
    size_mib = SIZE >> 20
    print_table("receiving process memory (fresh process, worst of the rounds)",
                ["peak RSS MiB", "growth during get MiB", "file MiB", "peak / file"],
                [(round(peak, 1), round(growth, 1), size_mib, round(peak / size_mib, 2))])
    worst = min(paths["get_file, new dest"]["x_copy"], paths["get_file, over existing"]["x_copy"])
    mem_ok = peak < size_mib and growth < MAX_GROWTH_FRACTION * size_mib
    result: dict[str, Any] = {
        "size_bytes": SIZE, "rounds": rounds, "target_ratio": TARGET,
        "chunk_size": transfer.DEFAULT_CHUNK_SIZE, "window_bytes": transfer.WINDOW_BYTES,
        "paths": paths, "worst_get_ratio": worst,
        "receiver": {"peak_rss_mib": round(peak, 1), "growth_mib": round(growth, 1),
                     "peak_over_size": round(peak / size_mib, 3)},
        "pass": worst >= TARGET and mem_ok,
    }
    print(f"target: get_file >= {TARGET}x file copy (worst of both destinations: {worst}x); "
          f"receiver peak RSS < file size ({peak:.0f} MiB), growth < {MAX_GROWTH_FRACTION}x "
          f"file size ({growth:.0f} MiB) -> {'PASS' if result['pass'] else 'FAIL'}")
    return result


async def _receive(url: str, dest: Path) -> dict[str, Any]:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    baseline = _peak_rss_kib()
    seconds = await _timed(lambda: transfer.get_file(js, BUCKET, "obj", dest))
    await nc.close()
    return {"seconds": seconds, "baseline_kib": baseline, "maxrss_kib": _peak_rss_kib()}


if __name__ == "__main__" and sys.argv[1:2] == ["--receive"]:
    out = anyio.run(_receive, sys.argv[2], Path(sys.argv[3]), backend_options=UVLOOP)
    print(json.dumps(out))
