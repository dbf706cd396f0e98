"""The API node: converges on its infra's desired API deployments and serves them.

Desired state comes from the ``sy_deploy`` KV bucket (keys ``api.<infra>.*``): a watch
for speed, a periodic re-read and one on reconnect for certainty, so a node that was
down or joins later converges by itself.  Per service, one change at a time:

    fetch and verify every generation of the mapping (``generations``)
    -> build the code environment of each one that has one and is not built here yet
       (``nodes.envs``; a second generation or service with the same lock builds nothing)
    -> load each one in every worker, beside serving (``load()`` and ``warmup()``)
    -> switch every worker's route: only now does traffic reach the new generation,
       and generations that left the mapping are dropped (workers run one request at a
       time, so none is in flight on them)

A generation with a code environment is loaded with that environment's interpreter: each
worker runs its user code in a host process of it, so a switch between environments
loads the new one beside the old, like any switch.

The route carries the service's prediction capture settings too (``capture``): a deploy
that changes only those re-routes the workers, with nothing to load.

A failure (a package that does not verify, an environment that cannot be built, a
``load()`` that raises) leaves the previous mapping serving, and is reported in
heartbeats, as a report and as an event.
Every API node also serves HTTP (``gateway``) on ``--http-port``.

Its workers are elastic between ``min_workers`` and ``max_workers``: about every
``sample_every_s`` (at random moments: ``autoscale.sample_interval``) the node samples
busy workers, requests waiting for one (from the workers' busy pages, and those it holds)
and the recent p99, exports them for outside autoscalers (``metrics``), and asks the policy
(``autoscale``) whether to scale; a decision resizes the pool (``WorkerPool.scale_to``),
counts in /metrics, and is an ``api.scaled`` event.
"""

from __future__ import annotations

import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from nodes.api.autoscale import (
    RecentQuantile,
    Sample,
    ScalePolicy,
    ScaleSettings,
    WindowMean,
    sample_interval,
)
from nodes.api.gateway import Gateway
from nodes.api.generations import PackageRefused, PackageStore, ensure
from nodes.api.http import HttpServer
from nodes.api.httplimits import HttpLimits
from nodes.api.metrics import Metrics
from nodes.api.wire import EndpointCode
from nodes.api.workers import WorkerPool
from nodes.auth.artifacts import trust_of
from nodes.envs.options import BuildInterrupted, EnvOptions, interrupted, node_env_store
from nodes.envs.store import EnvBuildFailed
from nodes.runtime import transfer
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import Entry, KVCache
from nodes.runtime.loops import forever, supervised
from nodes.runtime.node import Node
from protocol import subjects
from protocol.api import (
    API_DEPLOYMENT_VALUE,
    LATENCY_BUCKETS_S,
    ApiDeploymentRecord,
    GenerationFailed,
    GenerationReport,
    GenerationsServing,
)
from protocol.base import encode
from protocol.deploy import deployment_keys
from protocol.envs import EnvLock
from protocol.events import ApiScaled
from protocol.state import ApiState, MappingFailure, ServiceState

UTILIZATION_WINDOW_S = 10.0  # what /metrics exports: the mean busy share of this long


def _capture(rec: ApiDeploymentRecord) -> bytes:
    """A record's capture settings as the workers get them (``wire.Route.capture``)."""
    return encode(rec.capture) if rec.capture is not None and rec.capture.on else b""


def default_workers() -> int:
    """One worker per core but one, at most 8: the node's own process (HTTP, the
    gateway) and a local nats-server need a core too.  On 2 cores, 2 workers measured
    0.74-0.79x raw nats-py on the no-op benchmark against 0.85-0.89x for 1 (bench/RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


class ApiNode(Node):
    role: ClassVar[str] = "api"

    def __init__(self, *, data_dir: Path | None = None, workers: int | None = None,
                 scaling: ScaleSettings | None = None,
                 http_port: int | None = 8080, http_host: str = "0.0.0.0",
                 request_timeout: float = 30.0, queue_timeout: float = 1.0,
                 kill_grace: float = 5.0, worker_memory_mb: int | None = None,
                 max_body: int = 512 * 1024, retry_after: float = 0.25,
                 metrics_interval: float = 5.0, resync_interval: float = 5.0,
                 debug: bool = False, http_limits: HttpLimits | None = None,
                 envs: EnvOptions | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.http_limits = http_limits or HttpLimits()
        self.data_dir = (data_dir or Path(".shipyard") / "nodes" / self.name).resolve()
        self.store = PackageStore(self.data_dir)
        self.env_options = envs or EnvOptions()
        self.envs = node_env_store(self.data_dir, self.env_options, lambda: self.js)
        self._gen_envs: dict[tuple[str, str], EnvLock] = {}  # (service, gen) -> its env
        if scaling is not None and workers is not None:
            raise ValueError("give workers (a fixed count) or scaling (bounds), not both")
        n = workers or default_workers()
        self.scaling = scaling or ScaleSettings(min_workers=n, max_workers=n)
        self.n_workers = self.scaling.min_workers  # at start
        self.http_port = http_port
        self.http_host = http_host
        self.request_timeout = request_timeout
        self.retry_after = retry_after
        self.max_body = max_body
        self.metrics_interval = metrics_interval
        self.resync_interval = resync_interval
        self.metrics = Metrics(self.name, self.role)
        self.metrics.workers_min = self.scaling.min_workers
        self.metrics.workers_max = self.scaling.max_workers
        self.pool = WorkerPool(self.n_workers, nats=self.settings, node=self.name,
                               infra=self.infra, run_dir=self.data_dir / "run",
                               metrics=self.metrics, max_body=max_body,
                               queue_timeout=queue_timeout, request_timeout=request_timeout,
                               kill_grace=kill_grace, debug=debug,
                               memory_mb=worker_memory_mb,
                               max_size=self.scaling.max_workers)
        self.services: dict[str, ServiceState] = {}  # heartbeat state per service
        self.gateway: Gateway | None = None
        self.http: HttpServer | None = None
        self._desired: KVCache[ApiDeploymentRecord] | None = None
        self._packages: KeyValue | None = None
        self._switching: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._kick = anyio.Event()
        self._tg: TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def setup(self) -> None:
        await anyio.Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.pool.nc = self.nc
        r = self.settings.replicas
        deploy = await ensure_kv(self.js, subjects.DEPLOY_BUCKET, replicas=r)
        self._packages = await ensure_kv(self.js, subjects.API_PACKAGE_BUCKET, replicas=r)
        await transfer.ensure_bucket(self.js, subjects.API_PACKAGE_STORE, replicas=r)
        await transfer.ensure_bucket(self.js, subjects.WHEELS_STORE, replicas=r)
        self._desired = KVCache(deploy, deployment_keys("api", self.infra),
                                API_DEPLOYMENT_VALUE.decode,
                                on_change=self._on_desired,
                                resync_interval=self.resync_interval)
        self.gateway = Gateway(self.nc, self.metrics, timeout=self.request_timeout + 1.0,
                               retry_after=self.retry_after, max_body=self.max_body,
                               resync_interval=self.resync_interval)

    async def started(self, tg: TaskGroup) -> None:
        assert self._desired is not None and self.gateway is not None
        self._tg = tg
        await tg.start(self.pool.run)
        await self.gateway.start(tg, self.js, self.settings.replicas)
        if self.http_port is not None:
            self.http = HttpServer(self.gateway, self.metrics, host=self.http_host,
                                   port=self.http_port, node=self.name, required=False,
                                   limits=self.http_limits)
            await tg.start(self.http.serve)
        await tg.start(self._desired.run)
        tg.start_soon(partial(supervised, "converge", self._converge_loop, tg, log=self.log))
        tg.start_soon(partial(supervised, "metrics", self._metrics_loop, log=self.log))
        tg.start_soon(partial(supervised, "scaling", self._scale_loop, log=self.log))
        tg.start_soon(partial(forever, "envs", self._collect_envs, log=self.log,
                              interval=self.env_options.gc_interval_s))

    def disconnected(self) -> None:
        if self.gateway is not None:
            self.gateway.disconnected()

    async def reconnected(self) -> None:
        if self._desired is not None:
            self._desired.resync()
        if self.gateway is not None:
            self.gateway.resync()

    async def stopping(self) -> None:
        """Leave the queue groups, finish what was accepted, then stop HTTP."""
        await self.pool.drain(timeout=self.request_timeout)
        if self.http is not None:
            await self.http.shutdown()

    def state(self) -> ApiState:
        return ApiState(data_dir=str(self.data_dir), workers=self.pool.size,
                        min_workers=self.scaling.min_workers,
                        max_workers=self.scaling.max_workers,
                        worker_pids=self.pool.pids(), worker_crashes=self.pool.crashes,
                        ready_workers=len(self.pool.serving),
                        http=self.http.url if self.http else None,
                        http_error=self.http.error if self.http else "",
                        services=dict(self.services),
                        envs=self.envs.states(self._env_users()))

    def _set(self, service: str, **changes: Any) -> ServiceState:
        """Change fields of ``service``'s state (the one place it changes)."""
        st = msgspec.structs.replace(self.services.get(service) or ServiceState(stage="idle"),
                                     **changes)
        self.services[service] = st
        return st

    # -- convergence --------------------------------------------------------------------

    async def _on_desired(self, key: str, entry: Entry[ApiDeploymentRecord] | None) -> None:
        self._kick.set()

    async def _converge_loop(self, tg: TaskGroup) -> None:
        assert self._desired is not None
        while not self.stopping_requested:
            self._kick = anyio.Event()
            now = time.monotonic()
            for entry in list(self._desired.entries.values()):
                rec = entry.value
                name = rec.service
                if name in self._switching or self._retry_at.get(name, 0) > now:
                    continue
                st = self.services.get(name) or ServiceState(stage="idle")
                if st.update == rec.update_id and st.stage in ("serving", "failed"):
                    continue
                if st.mapping == rec.mapping.describe() and st.stage == "serving" and \
                        self._capture_of(name) == _capture(rec):
                    self._set(name, update=rec.update_id)  # already serving exactly this
                    continue
                self._switching.add(name)
                tg.start_soon(self._switch, rec)
            with anyio.move_on_after(1.0 if self._retry_at else self.resync_interval):
                await self._kick.wait()

    async def _switch(self, rec: ApiDeploymentRecord) -> None:
        assert self._packages is not None
        name, mapping = rec.service, rec.mapping
        self._set(name, target=mapping.describe(), update=rec.update_id, stage="fetching")
        t0 = time.monotonic()
        generations = sorted({*mapping.generations, *([mapping.shadow] if mapping.shadow else [])})
        try:
            kinds: dict[str, dict[str, str]] = {}
            dirs = {}
            trust = await trust_of(self)  # every generation signed by a Design key
            for gen in generations:
                d, info, _ = await ensure(self.js, self._packages, self.store,
                                          self.data_dir / "downloads", name, gen,
                                          refusal=trust.package_refusal)
                dirs[gen] = (d, info)
                kinds[gen] = {e: spec.kind for e, spec in info.endpoints.items()}
            pythons: dict[str, str] = {}
            for gen in generations:
                lock = dirs[gen][1].env
                if lock is not None:
                    self._gen_envs[(name, gen)] = lock
                    if (name, gen) not in self.pool.generations:
                        pythons[gen] = await self._build_env(rec, gen, lock, generations)
            self._set(name, stage="loading")
            await self._report(rec, "loading", generations)
            for gen in generations:
                if (name, gen) in self.pool.generations:
                    continue
                d, info = dirs[gen]
                endpoints = [EndpointCode(e, s.kind, s.code, s.function)
                             for e, s in info.endpoints.items()]
                error = await self.pool.load(name, gen, d, endpoints,
                                             python=pythons.get(gen, ""))
                if error:
                    raise PackageRefused(f"{gen}: load failed: {error}")
            description = next((dirs[g][1].description for g in generations
                                if dirs[g][1].description), rec.description)
            error = await self.pool.route(name, encode(mapping), kinds, description,
                                          capture=_capture(rec))
            if error:
                raise PackageRefused(f"switch failed: {error}")
        except PackageRefused as exc:
            await self._failed(rec, str(exc), generations)
        except (nats.errors.Error, TimeoutError, OSError, transfer.TransferStalled) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self.log.warning("switch interrupted; will retry", service=name, error=reason)
            self._set(name, stage="retrying", error=reason)
            self._retry_at[name] = time.monotonic() + 2.0
        else:
            duration = time.monotonic() - t0
            self._set(name, mapping=mapping.describe(), generations=dict(mapping.generations),
                      shadow=mapping.shadow, stage="serving", failed=None, error="")
            self._retry_at.pop(name, None)
            self.log.info("serving", service=name, mapping=mapping.describe(),
                          ms=round(duration * 1000, 1))
            await self._report(rec, "serving", generations, duration=duration)
            await self.beat_now()
            await self.emit(GenerationsServing(service=name, infra=self.infra, node=self.name,
                                               update_id=rec.update_id,
                                               mapping=mapping.describe(),
                                               duration_s=round(duration, 4)))
        finally:
            self._switching.discard(name)
            self._kick.set()

    def _capture_of(self, service: str) -> bytes:
        """The capture settings the workers serve ``service`` with (JSON; "" off)."""
        route = self.pool.routes.get(service)
        return route.capture if route is not None else b""

    async def _build_env(self, rec: ApiDeploymentRecord, gen: str, lock: EnvLock,
                         generations: list[str]) -> str:
        """The interpreter of ``gen``'s code environment, built now if it is not built
        here yet (what serves keeps serving meanwhile).  Raises ``PackageRefused``."""
        python = self.envs.python_of(lock.digest)  # a stat
        if python is None:
            self._set(rec.service, stage="building")
            await self._report(rec, "building", generations, env=lock.name)
            await self.beat_now()
            try:
                python = await self.envs.ensure(lock)
            except EnvBuildFailed as exc:  # "building env <name>: <step> failed: <tail>"
                if interrupted(exc):  # NATS, not the lock: retried like a transfer
                    raise BuildInterrupted(exc.message) from None
                raise PackageRefused(f"{gen}: {exc.message}") from None
            self.log.info("code env built", service=rec.service, generation=gen,
                          env=lock.name, digest=lock.digest[:12])
        return str(python)

    def _env_users(self) -> dict[str, list[str]]:
        """Digest -> the generations that use it, ``"api <service>/<generation>"``:
        every generation loaded, and every one of a service being switched."""
        users: dict[str, list[str]] = {}
        for key, lock in list(self._gen_envs.items()):
            if key in self.pool.generations or key[0] in self._switching:
                users.setdefault(lock.digest, []).append(f"api {key[0]}/{key[1]}")
            else:
                del self._gen_envs[key]
        return users

    async def _collect_envs(self) -> None:
        """One collector pass: remove environments no generation has used for the
        grace period."""
        await self.envs.collect(set(self._env_users()))

    async def _failed(self, rec: ApiDeploymentRecord, reason: str,
                      generations: list[str]) -> None:
        st = self._set(rec.service, stage="failed",
                       failed=MappingFailure(update=rec.update_id, reason=reason))
        self.log.error("mapping refused", service=rec.service, mapping=rec.mapping.describe(),
                       reason=reason, still_serving=st.mapping)
        await self._report(rec, "failed", generations, reason=reason)
        await self.beat_now()
        await self.emit(GenerationFailed(service=rec.service, infra=self.infra, node=self.name,
                                         update_id=rec.update_id,
                                         mapping=rec.mapping.describe(), reason=reason,
                                         still_serving=st.mapping))

    async def _report(self, rec: ApiDeploymentRecord, stage: str, generations: list[str], *,
                      reason: str = "", duration: float = 0.0, env: str = "") -> None:
        report = GenerationReport(node=self.name, infra=self.infra, service=rec.service,
                                  update_id=rec.update_id, stage=stage, env=env,
                                  generations=generations, reason=reason,
                                  duration_s=round(duration, 4), ts=time.time())
        try:
            await self.nc.publish(report.subject(), encode(report))
        except Exception as exc:  # best effort; heartbeats carry the outcome
            self.log.debug("report not sent", error=str(exc))

    # -- requests and metrics -----------------------------------------------------------

    async def _metrics_loop(self) -> None:
        while True:
            await anyio.sleep(self.metrics_interval)
            self.metrics.workers = len(self.pool.workers)
            self.metrics.workers_busy = self.pool.busy
            report = self.metrics.report(self.infra, self.metrics_interval)
            try:
                await self.nc.publish(report.subject(), encode(report))
            except Exception as exc:
                self.log.debug("metrics report not sent", error=str(exc))

    # -- scaling ------------------------------------------------------------------------

    async def _scale_loop(self) -> None:
        """Sample the workers' load for /metrics and, when the node is elastic, for the
        policy; act on its decisions."""
        settings = self.scaling
        policy = ScalePolicy(settings)
        latency = RecentQuantile(list(LATENCY_BUCKETS_S), window_s=max(2.0, settings.up_after_s))
        utilization = WindowMean(UTILIZATION_WINDOW_S)
        m = self.metrics
        while not self.stopping_requested:
            await anyio.sleep(sample_interval(settings, random.random()))  # not in phase
            now = time.monotonic()
            busy = self.pool.busy
            m.workers, m.workers_busy = len(self.pool.workers), busy
            m.utilization = utilization.add(now, min(1.0, busy / max(1, m.workers)))
            p99 = latency.add(now, m.live_buckets())
            if not settings.elastic:
                continue
            serving = sum(1 for w in self.pool.serving if w.busy_since())  # not retiring
            decision = policy.observe(Sample(workers=self.pool.size, busy=serving,
                                             queued=self.pool.queued,
                                             p99_s=p99))
            if decision is not None:
                self._scale(decision.frm, decision.to, decision.reason)

    def _scale(self, frm: int, to: int, reason: str) -> None:
        """Resize the pool; count, log and announce it (the announcements in the
        background: a NATS outage delays them, never the next sample)."""
        self.pool.scale_to(to)
        event = ApiScaled(node=self.name, infra=self.infra, from_workers=frm, to_workers=to,
                          min_workers=self.scaling.min_workers,
                          max_workers=self.scaling.max_workers, reason=reason)
        self.metrics.scale_events[event.direction] += 1
        self.log.info("scaling workers", direction=event.direction, frm=frm, to=to,
                      reason=reason)
        if self._tg is not None:
            self._tg.start_soon(self._announce, event)

    async def _announce(self, event: ApiScaled) -> None:
        try:
            await self.emit(event)
            await self.beat_now()
        except Exception as exc:  # the event stream misses it; metrics and logs have it
            self.log.warning("scaling event not stored", error=str(exc) or type(exc).__name__)
