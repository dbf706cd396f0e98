"""The ``shipyard`` admin command line.

Exit codes: 0 success; 1 the operation failed (unknown name, refused, timed out);
2 usage error or NATS unreachable.  Expected errors print one line, no traceback.
"""

from __future__ import annotations

import sys

import click

import nodes
from nodes.cli.apis import api, deploy_api
from nodes.cli.audit import audit
from nodes.cli.auth import auth
from nodes.cli.auth_publish import auth_publish
from nodes.cli.capture import api_queries, api_replay
from nodes.cli.common import EXIT_FAILED, EXIT_USAGE, CliState, err
from nodes.cli.envs import envs_cmd
from nodes.cli.fleet import events_cmd, node_forget, nodes_cmd
from nodes.cli.govern import govern
from nodes.cli.health_check import node_health
from nodes.cli.monitor import monitor_cmd
from nodes.cli.projects import (
    bundle,
    deploy,
    deployments,
    history,
    infra,
    projects_cmd,
    rollback,
)
from nodes.cli.scenarios import build_cmd, run_group, runs_cmd, scenario
from nodes.cli.stack import node, up
from nodes.cli.status import alerts, status_cmd
from nodes.runtime.connection import CannotReachNats
from nodes.runtime.embedded import EmbeddedNatsError
from protocol.errors import OperationError, ShipyardError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.option("--nats", "nats_url", metavar="URL", default=None, envvar=None,
              help="NATS server URL(s). Default: $SHIPYARD_NATS_URL, ./.shipyard/stack.json, "
                   "nats://127.0.0.1:4222.")
@click.option("--identity", "identity", metavar="FILE", default=None,
              type=click.Path(dir_okay=False),
              help="Credentials file to connect and sign commands with. Default: "
                   "$SHIPYARD_IDENTITY, then the stack home's admin (HOME/auth/creds/"
                   "admin.creds) if it exists.")
@click.version_option(nodes.__version__, prog_name="shipyard")
@click.pass_context
def cli(ctx: click.Context, nats_url: str | None, identity: str | None) -> None:
    """shipyard: a NATS-native elastic AI stack.

    Start everything locally with 'shipyard up', then drive it from another shell.
    """
    ctx.obj = CliState(nats_url, identity)


cli.add_command(up)
cli.add_command(node)
node.add_command(node_forget)
node.add_command(node_health)
cli.add_command(nodes_cmd)
cli.add_command(envs_cmd)
cli.add_command(events_cmd)
cli.add_command(monitor_cmd)
cli.add_command(projects_cmd)
cli.add_command(bundle)
cli.add_command(infra)
cli.add_command(deploy)
cli.add_command(rollback)
cli.add_command(deployments)
cli.add_command(history)
cli.add_command(scenario)
cli.add_command(runs_cmd)
cli.add_command(run_group)
cli.add_command(build_cmd)
cli.add_command(api)
api.add_command(api_queries)
api.add_command(api_replay)
cli.add_command(auth)
auth.add_command(auth_publish)
cli.add_command(govern)
cli.add_command(audit)
cli.add_command(status_cmd)
cli.add_command(alerts)
deploy.add_command(deploy_api)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map expected errors to exit codes."""
    try:
        code = cli.main(args=argv, prog_name="shipyard", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        code = EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except CannotReachNats as exc:
        err.print(f"shipyard: {exc}")
        code = EXIT_USAGE
    except OperationError as exc:
        err.print(f"shipyard: {exc.message}")
        code = EXIT_FAILED
    except (EmbeddedNatsError, ShipyardError) as exc:
        err.print(f"shipyard: {exc}")
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
