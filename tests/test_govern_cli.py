"""``shipyard govern`` and ``infra create/set --govern`` through the real CLI, as
different identities, against in-process Deployer and Govern nodes."""

from __future__ import annotations

import json
import subprocess
from functools import partial
from pathlib import Path

import anyio

from protocol.govern import APPROVED, BUNDLE, PENDING, UNREVIEWED
from tests.authstack import auth_stack
from tests.govstack import gov_stack, people
from tests.helpers import fleet, shipyard


async def test_govern_cli_requests_reviews_and_enforces_policy_with_exit_codes(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    with auth_stack(tmp_path, *people()) as auth:
        async with fleet() as f, gov_stack(auth, f) as gov:
            await gov.publish_bundle("churn", "v1")
            await gov.publish_api("score", "2")

            async def cli(who: str, *args: str) -> subprocess.CompletedProcess[str]:
                env = {**cli_env, "SHIPYARD_NATS_URL": auth.server.url,
                       "SHIPYARD_IDENTITY": str(auth.store.creds_path(who))}
                return await anyio.to_thread.run_sync(partial(shipyard, *args, env=env,
                                                              cwd=tmp_path))

            listed = await cli("vera", "govern", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            rows = json.loads(listed.stdout)["artifacts"]
            assert [(r["kind"], r["name"], r["version"], r["status"]) for r in rows] == [
                ("api", "score", "2", UNREVIEWED), (BUNDLE, "churn", "v1", UNREVIEWED)]

            unreviewed = await cli("vera", "govern", "status", "churn", "v1", "--json")
            assert unreviewed.returncode == 0, unreviewed.stderr
            assert json.loads(unreviewed.stdout)["status"] == UNREVIEWED

            opened = await cli("dora", "govern", "request", "churn", "v1", "--comment",
                               "ready", "--json")
            assert opened.returncode == 0, opened.stderr
            review = json.loads(opened.stdout)["review"]
            assert (review["status"], review["requested_by"], review["comment"]) == (
                PENDING, "dora", "ready")

            mine = await cli("dora", "govern", "review", "churn", "v1", "--approve")
            assert mine.returncode == 1
            assert "dora requested the review of bundle churn v1 and cannot approve it" \
                in mine.stderr and "Traceback" not in mine.stderr

            approved = await cli("rita", "govern", "review", "churn", "v1", "--approve",
                                 "--comment", "tests pass")
            assert approved.returncode == 0, approved.stderr
            assert "bundle churn v1: approved (1/1 approvals)" in approved.stdout

            status = await cli("vera", "govern", "status", "churn", "v1")
            assert status.returncode == 0, status.stderr
            assert "requested by dora" in status.stdout
            assert "approved by rita" in status.stdout and "tests pass" in status.stdout
            as_json = json.loads((await cli("vera", "govern", "status", "churn", "v1",
                                            "--json")).stdout)
            assert as_json["status"] == APPROVED
            assert [(d["by"], d["verdict"]) for d in as_json["review"]["decisions"]] == [
                ("rita", "approve")]

            # Usage errors exit 2; an unknown artifact exits 1 with what was expected.
            for bad in (("govern", "review", "churn", "v1"),
                        ("govern", "review", "churn", "v1", "--approve", "--reject"),
                        ("govern", "status", "churn"),
                        ("govern", "status", "model", "score", "2"),
                        ("infra", "set", "p"),
                        ("infra", "create", "p", "--kind", "api", "--govern", "maybe")):
                proc = await cli("admin", *bad)
                assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
            missing = await cli("dora", "govern", "request", "api", "score", "9")
            assert missing.returncode == 1 and "API score 9 not found" in missing.stderr

            made = await cli("admin", "infra", "create", "p", "--kind", "api", "--govern",
                             "prevent", "--json")
            assert made.returncode == 0, made.stderr
            assert json.loads(made.stdout)["govern"] == "prevent"
            refused = await cli("dora", "deploy", "api", "score", "2", "--infra", "p")
            assert refused.returncode == 1
            assert ("API score 2 is not approved (not reviewed: request a review with "
                    "'shipyard govern request api score 2')") in refused.stderr

            changed = await cli("admin", "infra", "set", "p", "--govern", "warn")
            assert changed.returncode == 0 and "infra p: govern warn" in changed.stdout
            infras = json.loads((await cli("vera", "infra", "list", "--json")).stdout)
            assert [(i["name"], i["govern"]) for i in infras] == [("p", "warn")]
            warned = await cli("dora", "deploy", "api", "score", "2", "--infra", "p",
                               "--json")
            assert warned.returncode == 0, warned.stderr
            view = json.loads(warned.stdout)
            assert view["health"] == "WARNING"
            assert view["last_update"]["warnings"] == [
                "API score 2 is not approved (not reviewed: request a review with "
                "'shipyard govern request api score 2')"]
            # Only an admin changes an infra's policy.
            assert (await cli("dora", "infra", "set", "p", "--govern", "none")).returncode == 1
