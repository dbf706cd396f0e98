"""KV keys are built in protocol/ only: every builder refuses a bad name, every key it
builds is a key nats-server stores, and each family's filter finds exactly its keys."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig

from nodes.runtime.kvcache import snapshot
from nodes.runtime.settings import NatsSettings
from protocol.api import key_record_key, key_record_keys, package_key, package_keys
from protocol.bundles import bundle_key, bundle_keys
from protocol.deploy import deployment_key, deployment_keys, infra_key
from protocol.errors import BadName
from protocol.registry import registry_key
from protocol.scenarios import (
    cron_mark_key,
    fired_key,
    lock_key,
    lock_keys,
    run_log_name,
)

ROOT = Path(__file__).resolve().parent.parent

BAD = ["", "a.b", "a b", "a*", ">", "a>", "x" * 129, "é", "a\n"]

# Each builder with good arguments; the tests swap one argument at a time for a bad one.
BUILDERS: dict[str, tuple[Callable[..., str], tuple[str, ...]]] = {
    "deployment_key": (lambda *a: deployment_key("bundle", *a), ("prod", "churn")),
    "deployment_keys": (lambda *a: deployment_keys("api", *a), ("prod",)),
    "infra_key": (infra_key, ("prod",)),
    "bundle_key": (bundle_key, ("churn", "v1.2")),
    "bundle_keys": (bundle_keys, ("churn",)),
    "package_key": (package_key, ("scorer", "v3")),
    "package_keys": (package_keys, ("scorer",)),
    "key_record_key": (key_record_key, ("scorer", "k1")),
    "key_record_keys": (key_record_keys, ("scorer",)),
    "registry_key": (registry_key, ("a1",)),
    "fired_key": (fired_key, ("prod", "churn", "nightly", "cron-1700000000")),
    "lock_key": (lock_key, ("prod", "churn", "nightly")),
    "lock_keys": (lock_keys, ("prod",)),
    "cron_mark_key": (cron_mark_key, ("prod", "churn", "nightly")),
    "run_log_name": (run_log_name, ("churn-nightly-20260101T000000-abc123",)),
}

# Bundle ids and versions may hold dots; a firing id may be 256 characters long.
ALLOWED = {("bundle_key", 1): {"a.b"}, ("package_key", 1): {"a.b"},
           ("fired_key", 3): {"x" * 129}}
CASES = [(name, i, bad) for name, (_, args) in BUILDERS.items()
         for i in range(len(args))
         for bad in [*BAD, "x" * 257] if bad not in ALLOWED.get((name, i), set())]


@pytest.mark.parametrize(("name", "position", "bad"), CASES)
def test_every_key_builder_refuses_a_bad_name(name: str, position: int, bad: str) -> None:
    build, args = BUILDERS[name]
    build(*args)  # the good arguments pass
    wrong = list(args)
    wrong[position] = bad
    with pytest.raises(BadName, match="invalid"):
        build(*wrong)


def test_deployment_kinds_are_checked() -> None:
    with pytest.raises(BadName, match="deployment kind"):
        deployment_key("bundles", "prod", "churn")
    with pytest.raises(BadName, match="deployment kind"):
        deployment_keys("*")


def test_no_module_spells_a_kv_key_inline() -> None:
    """The key shapes the builders make do not appear as literals in nodes/."""
    shapes = re.compile(r"""f["'](lock|cron|bundle|api)\.\{|["'](lock|bundle|api)\.>["']"""
                        r"""|\.(get|put|create|update|delete)\(f["']""")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in sorted((ROOT / "nodes").rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if shapes.search(line)]
    assert found == []


async def test_keys_are_stored_and_each_filter_finds_exactly_its_family(
        settings: NatsSettings) -> None:
    """Every family of one bucket side by side, for two infras / projects / services: a
    filter's snapshot (a real KV watch) returns its own keys and nothing else."""
    families: dict[str, list[str]] = {
        deployment_keys("bundle", "prod"): [deployment_key("bundle", "prod", p)
                                            for p in ("churn", "fraud")],
        deployment_keys("bundle", "staging"): [deployment_key("bundle", "staging", "churn")],
        deployment_keys("api", "prod"): [deployment_key("api", "prod", "scorer")],
        lock_keys("prod"): [lock_key("prod", "churn", s) for s in ("nightly", "hourly")],
        lock_keys("staging"): [lock_key("staging", "churn", "nightly")],
        bundle_keys("churn"): [bundle_key("churn", b) for b in ("v1", "1.2.0")],
        bundle_keys("churn-x"): [bundle_key("churn-x", "v1")],
        package_keys("scorer"): [package_key("scorer", v) for v in ("v1", "2.0.1")],
        key_record_keys("fraud"): [key_record_key("fraud", "k9")],
    }
    unfiltered = [cron_mark_key("prod", "churn", "nightly"), infra_key("prod"),
                  registry_key("a1"), fired_key("prod", "churn", "nightly", "act-u1")]
    nc = await nats.connect(settings.url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="keys_test"))
        everything = [k for keys in families.values() for k in keys] + unfiltered
        for key in everything:
            await kv.put(key, key.encode())
        for family, keys in families.items():
            snap = await snapshot(kv, family)
            assert sorted(snap) == sorted(keys), family
            assert all(raw == k.encode() for k, (_, raw) in snap.items())
        # The all-infra filters span infras; the all-keys filter spans everything.
        assert sorted(await snapshot(kv, lock_keys())) == sorted(
            families[lock_keys("prod")] + families[lock_keys("staging")])
        assert sorted(await snapshot(kv, deployment_keys("bundle"))) == sorted(
            families[deployment_keys("bundle", "prod")]
            + families[deployment_keys("bundle", "staging")])
        assert sorted(await snapshot(kv, key_record_keys())) == sorted(everything)
    finally:
        await nc.close()


async def test_a_snapshot_has_every_live_key_of_its_filter_and_no_deleted_one(
        settings: NatsSettings) -> None:
    """Values and revisions of live keys only; a filter with nothing, or with only
    deletion markers, is empty; read many times over, a snapshot is never short."""
    nc = await nats.connect(settings.url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="snap_test"))
        assert await snapshot(kv, "a.>") == {}
        revs = {}
        for i in range(200):
            revs[f"a.k{i}"] = await kv.put(f"a.k{i}", f"v{i}".encode())
        await kv.put("b.other", b"x")
        await kv.delete("a.k7")
        await kv.put("c.gone", b"x")
        await kv.delete("c.gone")
        expected = {k: (r, f"v{k[3:]}".encode()) for k, r in revs.items() if k != "a.k7"}
        for _ in range(20):
            assert await snapshot(kv, "a.>") == expected
        assert await snapshot(kv, "c.>") == {}
    finally:
        await nc.close()
