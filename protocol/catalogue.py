"""The catalogue of the wire contract, generated from ``protocol/`` itself.

Subjects, JetStream streams, KV buckets and their key families, object stores, command
families and message types: everything another program needs to talk to shipyard.
Nothing here is spelled by hand: subject and key templates come from calling the real
builders with placeholder names (``ROLE`` -> ``<role>``), message types from the codecs
and families the nodes decode with.  ``python -m protocol.catalogue`` prints it (add
``--json`` for a machine-readable copy); a test checks the README's subject table against
it, so the documentation and the code cannot drift apart.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable
from typing import Any, get_args

import msgspec

import protocol
from protocol import (
    api,
    auth,
    bundles,
    deploy,
    envs,
    govern,
    leases,
    registry,
    scenarios,
    subjects,
)
from protocol.base import Codec, tag_of


class SubjectEntry(msgspec.Struct, frozen=True):
    template: str
    builder: str
    pattern: bool  # a wildcard subscription, not a subject anyone publishes to
    doc: str


class KeyEntry(msgspec.Struct, frozen=True):
    bucket: str
    template: str
    builder: str
    doc: str


class CommandEntry(msgspec.Struct, frozen=True):
    subject: str
    type: str
    reply: str
    doc: str


class MessageEntry(msgspec.Struct, frozen=True):
    codec: str
    tags: list[str]


class Catalogue(msgspec.Struct, frozen=True):
    subjects: list[SubjectEntry]
    streams: list[str]
    buckets: list[str]
    object_stores: list[str]
    keys: list[KeyEntry]
    commands: list[CommandEntry]
    messages: list[MessageEntry]


# Which bucket each key family lives in, with values for arguments that are not free
# names (a deployment key's kind is one of two words).
_KEY_FAMILIES: list[tuple[str, Callable[..., str], dict[str, str]]] = [
    (subjects.REGISTRY_BUCKET, registry.registry_key, {}),
    (subjects.INFRA_BUCKET, deploy.infra_key, {}),
    (subjects.DEPLOY_BUCKET, deploy.deployment_key, {"kind": "bundle"}),
    (subjects.DEPLOY_BUCKET, deploy.deployment_key, {"kind": "api"}),
    (subjects.BUNDLE_BUCKET, bundles.bundle_key, {}),
    (subjects.API_PACKAGE_BUCKET, api.package_key, {}),
    (subjects.API_KEYS_BUCKET, api.key_record_key, {}),
    (subjects.WHEELS_STORE, envs.wheel_key, {}),
    (subjects.FIRED_BUCKET, scenarios.fired_key, {}),
    (subjects.LOCKS_BUCKET, scenarios.lock_key, {}),
    (subjects.LOCKS_BUCKET, scenarios.cron_mark_key, {}),
    (subjects.IDENTITIES_BUCKET, auth.identity_key, {}),
    (subjects.NONCES_BUCKET, auth.nonce_key, {}),
    (subjects.GOVERN_BUCKET, govern.review_key, {"kind": "bundle"}),
    (subjects.GOVERN_BUCKET, govern.review_key, {"kind": "api"}),
    (subjects.LEASES_BUCKET, leases.lease_key, {}),
]

_NOT_SUBJECTS = {"token", "api_queue_group", "hears_notices"}


def _placeholder(name: str) -> str:
    return name.upper().replace("_", "-")


def _template(fn: Callable[..., str], fixed: dict[str, str] | None = None) -> str:
    """Call ``fn`` with a placeholder per argument and turn them back into ``<name>``."""
    fixed = fixed or {}
    args: list[str] = []
    names: dict[str, str] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.name in fixed:
            args.append(fixed[param.name])
            continue
        value = _placeholder(param.name)
        names[value] = f"<{param.name}>"
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            names[value] = f"<{param.name}...>"
        args.append(value)
    out = fn(*args)
    for value in sorted(names, key=len, reverse=True):
        out = out.replace(value, names[value])
    return out


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


def _subjects() -> list[SubjectEntry]:
    out: list[SubjectEntry] = []
    for name, fn in vars(subjects).items():
        if (name.startswith("_") or name in _NOT_SUBJECTS or not inspect.isfunction(fn)
                or fn.__module__ != subjects.__name__):
            continue
        template = _template(fn)
        out.append(SubjectEntry(template=template, builder=f"subjects.{name}",
                                pattern=template.endswith((".>", ".*")), doc=_doc(fn)))
    for name, value in vars(subjects).items():
        if name.endswith("_ALL") and isinstance(value, str):
            out.append(SubjectEntry(template=value, builder=f"subjects.{name}", pattern=True,
                                    doc=""))
    return out


def _codecs() -> list[MessageEntry]:
    out: list[MessageEntry] = []
    for info in pkgutil.iter_modules(protocol.__path__):
        if info.name == "catalogue":
            continue
        module = importlib.import_module(f"protocol.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Codec):
                kind = value.kind
                members = get_args(kind) or (kind,)
                tags = sorted(tag_of(m) if isinstance(m.__struct_config__.tag, str)
                              else m.__name__ for m in members)
                out.append(MessageEntry(codec=f"{info.name}.{name}", tags=tags))
    return sorted(out, key=lambda m: m.codec)


def _commands() -> list[CommandEntry]:
    import protocol.families

    out: list[CommandEntry] = []
    for family in protocol.families.ALL:
        for verb, cls in sorted(family.verbs.items()):
            subject = (f"{subjects.ROOT}.node.<node>.{verb}" if family.direct
                       else subjects.command(family.role, verb))
            reply = _reply_of(cls)
            out.append(CommandEntry(subject=subject, type=cls.__name__, reply=reply,
                                    doc=_doc(cls)))
    return out


def _reply_of(cls: type[Any]) -> str:
    for base in getattr(cls, "__orig_bases__", ()):
        for arg in get_args(base):
            return getattr(arg, "__name__", str(arg))
    return "?"


def build() -> Catalogue:
    """The whole catalogue, from the modules of ``protocol``."""
    consts = {n: v for n, v in vars(subjects).items() if isinstance(v, str) and n.isupper()}
    buckets = sorted(v for n, v in consts.items() if n.endswith("_BUCKET"))
    stores = sorted(v for n, v in consts.items() if n.endswith("_STORE"))
    streams = sorted([*(v for n, v in consts.items() if n.endswith("_STREAM")),
                      *(f"KV_{b}" for b in buckets), *(f"OBJ_{s}" for s in stores)])
    keys = [KeyEntry(bucket=bucket, template=_template(fn, fixed),
                     builder=f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}",
                     doc=_doc(fn))
            for bucket, fn, fixed in _KEY_FAMILIES]
    return Catalogue(subjects=_subjects(), streams=streams, buckets=buckets,
                     object_stores=stores, keys=keys, commands=_commands(),
                     messages=_codecs())


def subject_table(cat: Catalogue) -> list[str]:
    """The subject table, as the README shows it."""
    lines = ["| subject | built by | what travels there |", "|---|---|---|"]
    return lines + [f"| `{s.template}` | `{s.builder}` | {s.doc or 'subscription pattern'} |"
                    for s in cat.subjects]


def key_table(cat: Catalogue) -> list[str]:
    """The KV key table, as the README shows it."""
    lines = ["| bucket | key | built by |", "|---|---|---|"]
    return lines + [f"| `{k.bucket}` | `{k.template}` | `{k.builder}` |" for k in cat.keys]


def render(cat: Catalogue) -> str:
    """The catalogue as Markdown tables."""
    lines = ["## Subjects", "", *subject_table(cat)]
    lines += ["", "## KV keys", "", *key_table(cat)]
    lines += ["", "## Streams", ""] + [f"- `{s}`" for s in cat.streams]
    lines += ["", "## Object stores", ""] + [f"- `{s}`" for s in cat.object_stores]
    lines += ["", "## Commands", "", "| subject | body | reply |", "|---|---|---|"]
    lines += [f"| `{c.subject}` | `{c.type}` | `{c.reply}` |" for c in cat.commands]
    lines += ["", "## Message types", "", "| codec | tags |", "|---|---|"]
    lines += [f"| `{m.codec}` | {', '.join(f'`{t}`' for t in m.tags)} |" for m in cat.messages]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cat = build()
    if "--json" in args:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(cat)).decode() + "\n")
    else:
        sys.stdout.write(render(cat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
