"""Large-file transfer: ``get_file``/``put_file`` vs a plain file copy and nats-py's Object Store.

One 100 MiB file of random bytes, measured in one run on this machine, every source hot in
the page cache, uvloop in every process (as the nodes run), ``nats-server`` with the
``GOGC`` that ``shipyard up`` gives it (``GOGC=100 python -m bench transfer`` measures Go's
default instead; the server's GOGC and peak RSS are printed).  Each ``get_file`` case has a
file-copy baseline with the same kind of destination:

* ``new dest``: ``shutil.copyfile`` to a temporary name renamed onto an absent
  destination (the pattern ``get_file`` follows) -- the strictest baseline;
* ``over existing``: the same onto an existing 100 MiB file (freeing its pages is a fixed
  cost inside the timed step, which weighs far more on the in-kernel copy);
* ``durable``: the copy fsynced before the rename and the directory after, against
  ``get_file(durable=True)`` (disk-bound on both sides).

``get_file`` checks the bytes with BLAKE3 (recorded by ``put_file``); also reported:
``get_file`` checking SHA-256 instead (a caller that names only ``expected_sha256``),
``get_file`` forced onto its nats-py fallback path (``FAST_RECEIVE = False``),
``put_file``, nats-py's ``ObjectStore.put``/``get(writeinto)`` for reference, and a fresh
process that connects and receives the object, with its time and peak RSS
(``VmHWM``).  Steps run interleaved for several rounds, each after an ``os.sync()`` so none
pays for the previous step's writeback; medians are reported.

Target: ``get_file`` to a new destination >= 0.3x the new-destination copy (the strictest
of the three ratios decides ``pass``); the receiving process's peak RSS below the file size
and its growth during the get (the transfer's own memory) under a quarter of it.
"""

from __future__ import annotations

import hashlib
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
import blake3
import nats

from bench.common import ROOT, nats_server, print_table
from nodes.runtime import bulkfetch, embedded, transfer
from nodes.runtime.transfer import download

SIZE = 100 << 20
TARGET = 0.3
MAX_GROWTH_FRACTION = 0.25
BUCKET = "bench"
UVLOOP = {"use_uvloop": True}
CASES = {  # get_file path -> the copy it is compared with
    "get_file, new dest": "copy, new dest",
    "get_file, over existing": "copy, over existing",
    "get_file + fsync (durable)": "copy + fsync (durable)",
    "get_file, fresh process (new dest)": "copy, new dest",
    "get_file checking SHA-256, new dest": "copy, new dest",
    "get_file via nats-py fallback, new dest": "copy, new dest",
    "nats-py get(writeinto), new dest": "copy, new dest",
    "put_file": "copy, new dest",
    "nats-py put": "copy, new dest",
}
PATHS = ("copy, new dest", "copy, over existing", "copy + fsync (durable)", *CASES)


def _settle() -> None:
    """Flush dirty pages so no step pays for the previous step's writeback."""
    os.sync()


def _peak_rss_kib(pid: int | None = None) -> int:
    """A process image's peak RSS (VmHWM; ``ru_maxrss`` also counts the forked parent);
    this one's by default."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _mbps(seconds: float) -> float:
    return round(SIZE / seconds / 1e6, 1)


def _fresh(dest: Path) -> Path:
    dest.unlink(missing_ok=True)
    return dest


def _copy(src: Path, dest: Path, durable: bool = False) -> float:
    part = dest.with_name(dest.name + ".part")
    _settle()
    t0 = time.perf_counter()
    shutil.copyfile(src, part)
    if durable:
        with part.open("rb+") as f:
            os.fsync(f.fileno())
    os.replace(part, dest)
    if durable:
        transfer.fsync_dir(dest.parent)
    return time.perf_counter() - t0


async def _timed(aw: Callable[[], Awaitable[Any]]) -> float:
    _settle()
    t0 = time.perf_counter()
    await aw()
    return time.perf_counter() - t0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(url: str, server_pid: int, src: Path, tmp: Path,
                 times: dict[str, list[float]], cpu: dict[str, float]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    get = transfer.get_file
    times["put_file"].append(await _timed(lambda: transfer.put_file(js, BUCKET, "obj", src)))
    new, old = _fresh(tmp / "get-new.bin"), tmp / "get-old.bin"
    server0, client0 = _cpu_seconds(server_pid), time.process_time()
    times["get_file, new dest"].append(await _timed(lambda: get(js, BUCKET, "obj", new)))
    cpu["server"] += _cpu_seconds(server_pid) - server0
    cpu["client"] += time.process_time() - client0
    stored = await transfer.stat(js, BUCKET, "obj")
    sha = _fresh(tmp / "get-sha256.bin")  # a caller that trusts only a SHA-256
    times["get_file checking SHA-256, new dest"].append(await _timed(
        lambda: get(js, BUCKET, "obj", sha, expected_sha256=stored.sha256)))
    times["get_file, over existing"].append(await _timed(lambda: get(js, BUCKET, "obj", old)))
    durable = _fresh(tmp / "get-durable.bin")
    times["get_file + fsync (durable)"].append(
        await _timed(lambda: get(js, BUCKET, "obj", durable, durable=True)))
    slow = _fresh(tmp / "get-fallback.bin")
    download.FAST_RECEIVE = False
    try:
        times["get_file via nats-py fallback, new dest"].append(
            await _timed(lambda: get(js, BUCKET, "obj", slow)))
    finally:
        download.FAST_RECEIVE = True
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
    _settle()
    proc = subprocess.run([sys.executable, "-m", "bench.transfer", "--receive", url, str(dest)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"receiver failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def server_env_gogc() -> str:
    """The GOGC the benchmark's nats-server runs with (see ``nodes.runtime.embedded``)."""
    return os.environ.get("GOGC", str(embedded.DEFAULT_GOGC))


def _hash_gb_s(new: Callable[[], Any]) -> float:
    data = memoryview(os.urandom(SIZE))
    h = new()
    t0 = time.perf_counter()
    for i in range(0, SIZE, 1 << 20):
        h.update(data[i:i + (1 << 20)])
    return round(SIZE / (time.perf_counter() - t0) / 1e9, 2)


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 3 if quick else 11
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu = {"server": 0.0, "client": 0.0}
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
                times["copy + fsync (durable)"].append(
                    _copy(src, _fresh(tmp / "copy-durable.bin"), durable=True))
                assert server.proc is not None
                anyio.run(_round, server.url, server.proc.pid, src, tmp, times, cpu,
                          backend_options=UVLOOP)
                rss.append(_fresh_process(server.url, _fresh(tmp / "fresh.bin")))
                times["get_file, fresh process (new dest)"].append(rss[-1]["seconds"])
            server_hwm_kib = _peak_rss_kib(server.proc.pid)
            ref = anyio.run(_nats_py, server.url, src, tmp / "natspy.bin",
                            backend_options=UVLOOP)
        for name in ("get-new.bin", "get-old.bin", "get-durable.bin", "get-fallback.bin",
                     "get-sha256.bin", "fresh.bin", "natspy.bin"):
            assert (tmp / name).read_bytes() == src.read_bytes(), f"{name} differs from src"
    times["nats-py put"] = [ref["put"]]
    times["nats-py get(writeinto), new dest"] = [ref["get"]]
    paths: dict[str, dict[str, Any]] = {}
    for name in PATHS:
        mbps = _mbps(statistics.median(times[name]))
        baseline = _mbps(statistics.median(times[CASES.get(name, name)]))
        paths[name] = {"mb_s": mbps, "x_copy": round(mbps / baseline, 3),
                       "vs": CASES.get(name, name),
                       "rounds_mb_s": [_mbps(t) for t in times[name]]}
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
    # The floor: both cores are busy during a get, so CPU seconds per GB bound its speed.
    gb = rounds * SIZE / 1e9
    server_s, client_s = cpu["server"] / gb, cpu["client"] / gb
    floor = {"server_cpu_s_per_gb": round(server_s, 3), "client_cpu_s_per_gb": round(client_s, 3),
             "blake3_gb_s": _hash_gb_s(blake3.blake3), "sha256_gb_s": _hash_gb_s(hashlib.sha256),
             "cpu_bound_max_mb_s": round(os.cpu_count() or 1) * 1000 / (server_s + client_s)}
    floor["cpu_bound_max_mb_s"] = round(floor["cpu_bound_max_mb_s"], 1)
    gogc = server_env_gogc()
    print(f"nats-server: GOGC={gogc}, peak RSS {server_hwm_kib / 1024:.0f} MiB")
    print_table("get_file, new dest: CPU per GB received (all rounds; 10 ms clock ticks)",
                ["nats-server CPU s/GB", "receiver CPU s/GB", "BLAKE3 alone GB/s",
                 "SHA-256 alone GB/s",
                 f"max MB/s if all {os.cpu_count()} cores were busy"],
                [tuple(floor.values())])
    ratios = {case: paths[case]["x_copy"] for case in
              ("get_file, new dest", "get_file, over existing", "get_file + fsync (durable)")}
    strictest = ratios["get_file, new dest"]
    mem_ok = peak < size_mib and growth < MAX_GROWTH_FRACTION * size_mib
    result: dict[str, Any] = {
        "size_bytes": SIZE, "rounds": rounds, "target_ratio": TARGET,
        "chunk_size": transfer.DEFAULT_CHUNK_SIZE, "window_bytes": download.WINDOW_BYTES,
        "ring_bytes": bulkfetch.BLOCKS * bulkfetch.BLOCK_BYTES,
        "paths": paths, "get_ratios": ratios, "new_dest_ratio": strictest, "cpu": floor,
        "server": {"gogc": gogc, "peak_rss_mib": round(server_hwm_kib / 1024, 1)},
        "receiver": {"peak_rss_mib": round(peak, 1), "growth_mib": round(growth, 1),
                     "peak_over_size": round(peak / size_mib, 3)},
        "pass": strictest >= TARGET and mem_ok,
    }
    print(f"target: get_file >= {TARGET}x the copy; " + ", ".join(
        f"{case.removeprefix('get_file').strip(', ')}: {ratio}x "
        f"({'ok' if ratio >= TARGET else 'below'})" for case, ratio in ratios.items())
        + f"; receiver peak RSS {peak:.0f} MiB < {size_mib}, growth {growth:.0f} MiB < "
        f"{MAX_GROWTH_FRACTION * size_mib:.0f} -> {'PASS' if result['pass'] else 'FAIL'} "
        "(judged on the new-destination ratio and memory)")
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
