"""The catalogue of the wire contract is generated from protocol/, and the README's
tables are that catalogue: documentation and code cannot drift apart."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import protocol
from protocol import catalogue

README = Path(__file__).resolve().parent.parent / "README.md"


def _table_after(text: str, header: str) -> list[str]:
    start = text.index(header)
    block = text[start:].split("\n\n", 1)[0]
    return block.splitlines()


def test_readme_subject_table_is_the_generated_catalogue() -> None:
    cat = catalogue.build()
    expected = catalogue.subject_table(cat)
    assert _table_after(README.read_text(), expected[0]) == expected


def test_readme_kv_key_table_is_the_generated_catalogue() -> None:
    cat = catalogue.build()
    expected = catalogue.key_table(cat)
    assert _table_after(README.read_text(), expected[0]) == expected


def test_every_key_builder_in_protocol_is_in_the_catalogue() -> None:
    """A new key family cannot be added without the catalogue (and the README) showing it."""
    listed = {(fn.__module__, fn.__name__) for _, fn, _ in catalogue._KEY_FAMILIES}
    found = set()
    for info in pkgutil.iter_modules(protocol.__path__):
        module = importlib.import_module(f"protocol.{info.name}")
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ \
                    and name.endswith("_key"):
                found.add((fn.__module__, name))
    assert found == listed


def test_catalogue_templates_name_their_placeholders() -> None:
    cat = catalogue.build()
    assert {"sy.hb.<role>.<node>", "sy.cmd.<role>.<verb>",
            "sy.api.v1.<service>.<endpoint>"} <= {s.template for s in cat.subjects}
    assert all("<" in k.template for k in cat.keys)
    assert "SY_EVENTS" in cat.streams
    heartbeat = next(m for m in cat.messages if m.codec == "heartbeat.HEARTBEAT")
    assert heartbeat.tags == ["heartbeat"]
    assert any(c.subject == "sy.cmd.deployer.nodes.list" and c.reply == "NodeList"
               for c in cat.commands)


def test_catalogue_command_prints_markdown_and_json() -> None:
    text = subprocess.run([sys.executable, "-m", "protocol.catalogue"], check=True,
                          capture_output=True, text=True).stdout
    assert "## Subjects" in text and "`sy_deploy`" in text
    data = json.loads(subprocess.run([sys.executable, "-m", "protocol.catalogue", "--json"],
                                     check=True, capture_output=True, text=True).stdout)
    assert {"subjects", "streams", "buckets", "object_stores", "keys", "commands",
            "messages"} <= set(data)
