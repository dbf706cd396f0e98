"""Bundles and deployments through the real CLI, with every node a real process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import nats

from nodes.runtime import transfer
from nodes.runtime.embedded import EmbeddedNats
from protocol import subjects
from protocol.bundles import BUNDLE_INFO, bundle_key
from tests.helpers import shipyard, wait_until
from tests.projects import make_project


def _json(env: dict[str, str], cwd: Path, *args: str) -> Any:
    proc = shipyard(*args, env=env, cwd=cwd, check=True)
    return json.loads(proc.stdout)


def test_bundle_deploy_rollback_and_history_through_the_cli(cluster: dict[str, str],
                                                            tmp_path: Path) -> None:
    env, ws = cluster, tmp_path / "ws"
    make_project(ws, "churn", version="1")
    ok = shipyard("infra", "create", "prod", "--kind", "automation", "--stage", "production",
                  env=env, check=True)
    assert "infra prod created" in ok.stdout
    infras = _json(env, tmp_path, "infra", "list", "--json")
    assert [(i["name"], i["kind"], i["stage"]) for i in infras] == [
        ("prod", "automation", "production")]

    created = shipyard("bundle", "create", "churn", "--id", "v1", "--notes", "first",
                       env=env, check=True)
    assert "bundle churn v1 created: 4 files" in created.stdout
    assert "first bundle of this project" in created.stdout

    deployed = shipyard("deploy", "bundle", "churn", "v1", "--infra", "prod", "--wait",
                        env=env, timeout=60)
    assert deployed.returncode == 0, deployed.stderr
    assert "every online node of prod runs churn v1" in deployed.stdout

    make_project(ws, "churn", version="2", extra_files={"docs/new.md": "new"})
    second = shipyard("bundle", "create", "churn", "--id", "v2", env=env, check=True)
    assert "changes since v1: 1 added, 0 removed, 1 changed" in second.stdout
    assert "+ docs/new.md" in second.stdout and "~ recipes/clean.py" in second.stdout
    assert shipyard("deploy", "bundle", "churn", "v2", "--infra", "prod", "--wait",
                    env=env, timeout=60).returncode == 0
    back = shipyard("rollback", "churn", "--infra", "prod", "--wait", env=env, timeout=60)
    assert back.returncode == 0, back.stderr

    [dep] = _json(env, tmp_path, "deployments", "--json")
    assert (dep["project"], dep["infra"], dep["desired"], dep["previous"]) == (
        "churn", "prod", "v1", "v2")
    assert dep["state"] == "in_sync" and dep["health"] == "HEALTHY"
    assert sorted((n["node"], n["running"]) for n in dep["nodes"]) == [("a1", "v1"),
                                                                       ("a2", "v1")]
    history = wait_until(lambda: _finished(env, tmp_path), timeout=10, message="history")
    assert [(h["action"], h["from_bundle"], h["to_bundle"], h["result"]) for h in history] == [
        ("deploy", None, "v1", "succeeded"), ("deploy", "v1", "v2", "succeeded"),
        ("rollback", "v2", "v1", "succeeded")]
    assert all("@" in h["by"] and h["at"] > 0 for h in history)
    bundles = _json(env, tmp_path, "bundle", "list", "churn", "--json")
    assert [(b["id"], b["notes"]) for b in bundles] == [("v1", "first"), ("v2", "")]
    text = shipyard("deployments", env=env, check=True).stdout
    assert "churn" in text and "in_sync" in text and "a1=v1" in text


def _finished(env: dict[str, str], cwd: Path) -> list[dict[str, Any]] | None:
    history = _json(env, cwd, "history", "churn", "--infra", "prod", "--json")
    return history if all(h["result"] != "pending" for h in history) else None


def test_cli_errors_exit_1_with_the_reason(cluster: dict[str, str], tmp_path: Path) -> None:
    env, ws = cluster, tmp_path / "ws"
    project = make_project(ws, "churn")
    shipyard("infra", "create", "prod", "--kind", "automation", env=env, check=True)
    shipyard("bundle", "create", "churn", "--id", "v1", env=env, check=True)
    cases = [
        (["bundle", "create", "churn", "--id", "v1"], "already exists"),
        (["bundle", "create", "nope", "--id", "v1"], "unknown project 'nope'"),
        (["deploy", "bundle", "churn", "v9", "--infra", "prod"], "bundle 'v9' of project"),
        (["deploy", "bundle", "nope", "v1", "--infra", "prod"], "of project 'nope' not found"),
        (["deploy", "bundle", "churn", "v1", "--infra", "staging"], "unknown infra 'staging'"),
        (["infra", "create", "prod", "--kind", "automation"], "already exists"),
        (["history", "churn", "--infra", "prod"], "never been deployed"),
        (["rollback", "churn", "--infra", "prod"], "not deployed"),
    ]
    for args, needle in cases:
        proc = shipyard(*args, env=env)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    manifest = project / "shipyard.toml"
    manifest.write_text(manifest.read_text().replace('inputs = ["raw"]', 'inputs = 3'))
    proc = shipyard("bundle", "create", "churn", "--id", "v2", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("shipyard: churn/shipyard.toml: recipes.clean.inputs: "
                                   "expected array, got int")
    usage = shipyard("deploy", "bundle", "churn", env=env)
    assert usage.returncode == 2


async def _flip_a_stored_chunk(url: str, project: str, bundle: str) -> None:
    """Corrupt one chunk of a stored bundle archive in place (its meta data, and the
    bundle record, still describe the original bytes)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(subjects.BUNDLE_BUCKET)
        entry = await kv.get(bundle_key(project, bundle))
        assert entry.value is not None
        info = BUNDLE_INFO.decode(entry.value)
        stored = await transfer.stat(js, subjects.BUNDLE_STORE, info.archive)
        stream = f"OBJ_{subjects.BUNDLE_STORE}"
        chunk = await js.get_last_msg(stream, f"$O.{subjects.BUNDLE_STORE}.C.{stored.nuid}")
        assert chunk.data and chunk.seq is not None
        await js.delete_msg(stream, chunk.seq)
        await js.publish(chunk.subject or "", bytes(b ^ 0xFF for b in chunk.data))
    finally:
        await nc.close()


def test_a_corrupted_stored_bundle_is_refused_and_the_old_one_keeps_running(
        cluster: dict[str, str], nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """A chunk of a stored archive flipped behind the Object Store's back: every node
    refuses the bundle with the reason, the deploy exits 1, v1 stays active."""
    env, ws = cluster, tmp_path / "ws"
    make_project(ws, "churn", version="1")
    shipyard("infra", "create", "prod", "--kind", "automation", env=env, check=True)
    shipyard("bundle", "create", "churn", "--id", "v1", env=env, check=True)
    shipyard("deploy", "bundle", "churn", "v1", "--infra", "prod", "--wait", env=env,
             timeout=60, check=True)
    make_project(ws, "churn", version="2")
    shipyard("bundle", "create", "churn", "--id", "v2", env=env, check=True)
    anyio.run(_flip_a_stored_chunk, nats_server.url, "churn", "v2")

    deployed = shipyard("deploy", "bundle", "churn", "v2", "--infra", "prod", "--wait",
                        env=env, timeout=60)
    assert deployed.returncode == 1, (deployed.stdout, deployed.stderr)
    assert "BLAKE3 mismatch" in deployed.stderr + deployed.stdout
    assert "Traceback" not in deployed.stderr
    [dep] = _json(env, tmp_path, "deployments", "--json")
    assert (dep["desired"], dep["state"], dep["health"]) == ("v2", "failed", "ERROR")
    assert sorted((n["node"], n["running"]) for n in dep["nodes"]) == [("a1", "v1"),
                                                                       ("a2", "v1")]
    assert any("stored archive is damaged" in r and "BLAKE3 mismatch" in r
               for r in dep["reasons"]), dep["reasons"]
    for node in ("a1", "a2"):  # on disk: v1 active and whole, nothing of v2 unpacked
        project = tmp_path / "nodes" / node / "projects" / "churn"
        assert (project / "current").resolve() == (project / "bundles" / "v1").resolve()
        assert "VERSION = '1'" in (project / "current" / "recipes" / "clean.py").read_text()
        assert sorted(p.name for p in (project / "bundles").iterdir()) == ["v1"]


def test_bundle_changes_show_file_names_verbatim(cluster: dict[str, str],
                                                 tmp_path: Path) -> None:
    """File names and notes that look like terminal markup are printed as they are, not
    styled away or refused after the bundle was already stored."""
    env, ws = cluster, tmp_path / "ws"
    make_project(ws, "churn", version="1")
    shipyard("bundle", "create", "churn", "--id", "v1", env=env, check=True)
    make_project(ws, "churn", version="1",
                 extra_files={"docs/[bold]draft.md": "a", "docs/a[/green]b.md": "b"})
    second = shipyard("bundle", "create", "churn", "--id", "v2", "--notes", "[wip] a[/x]",
                      env=env)
    assert second.returncode == 0, second.stderr
    assert "changes since v1: 2 added, 0 removed, 0 changed" in second.stdout
    assert "+ docs/[bold]draft.md" in second.stdout
    assert "+ docs/a[/green]b.md" in second.stdout
    listed = shipyard("bundle", "list", "churn", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "[wip] a[/x]" in listed.stdout
