"""The sandbox (what runs in a user's interpreter) imports the standard library and
itself only; its frames decode the same on both sides (stdlib json in the sandbox,
msgspec in shipyard); its bootstrap puts nothing of shipyard on ``sys.path``."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.flow import wire
from nodes.sandbox import frames, launch, messages

SANDBOX = Path(launch.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, (node.module or "").split(".")[0]))
    return out


def test_the_sandbox_imports_only_the_standard_library_and_itself() -> None:
    files = sorted(SANDBOX.glob("*.py"))
    assert len(files) >= 8, files
    bad = [f"{f.name}:{line}: import {name}" for f in files for line, name in _imports(f)
           if name not in sys.stdlib_module_names and name != "__future__"]
    assert bad == [], bad


def test_the_import_check_sees_a_third_party_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom . import x\nimport msgspec.json\nfrom anyio import abc\n")
    assert [n for _, n in _imports(f) if n not in sys.stdlib_module_names] == \
        ["msgspec", "anyio"]


SAMPLES: list[Any] = [
    messages.JobSpec(kind="recipe", name="clean", code="/p/r.py", cwd="/p",
                     sys_path=["/p"], inputs={"raw": "/d/raw.csv"},
                     outputs={"clean": "/d/.sy-tmp-clean"}, params={"n": 3, "f": 0.5,
                                                                    "s": "é", "l": [1, None]},
                     memory_mb=512, measure=False),
    messages.Spawn(job=7, spec=b"\x00\xffraw"),
    messages.Stop(job=7, grace_s=1.5),
    messages.Ready(pid=42),
    messages.Started(job=7, pid=43),
    messages.Output(job=7, data=b"line\n\xff\x00"),
    messages.Exited(job=7, returncode=-9, peak_rss_kb=1000, spawn_error="", report=b"r"),
    messages.Report(ok=False, exit_code=3, error="ValueError: x", traceback_tail=["a", "b"],
                    memory_error=True, metrics={"clean": {"row_count": 3, "x": 0.25}}),
    messages.Load(gen="g1", service="churn", name="v1", directory="/x",
                  endpoints=[["predict", "prediction", "model.py", "predict"]]),
    messages.Unload(gen="g1"),
    messages.Done(error="boom", memory_error=True),
    messages.Call(gen="g1", endpoint="predict", op=1, sizes=[2, 3], payload=b"{}[1]"),
    messages.Reply(status=0, body=b'{"result":1}'),
]
KINDS = {**messages.TO_SERVER, **messages.FROM_SERVER, **messages.TO_HOST,
         **messages.FROM_HOST, messages.JobSpec.KIND: messages.JobSpec,
         messages.Report.KIND: messages.Report}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_frame_decodes_to_the_same_message_on_both_sides(msg: Any) -> None:
    for data in (frames.encode(msg), wire.encode(msg)):  # written by the sandbox, shipyard
        kind, meta, blob = frames.split(data)
        assert frames.decode(KINDS, kind, meta, blob) == msg       # the sandbox (json)
        assert wire.decode(KINDS, kind, meta, blob) == msg         # shipyard (msgspec)
        got = frames.Deframer().feed(data[:5]) + frames.Deframer().feed(data)
        assert got == [(kind, meta, blob)]


def test_frames_split_across_reads_come_out_whole_and_in_order() -> None:
    data = b"".join(frames.encode(m) for m in SAMPLES)
    d = frames.Deframer()
    out = []
    for i in range(0, len(data), 7):
        out += d.feed(data[i:i + 7])
    assert [frames.decode(KINDS, *f) for f in out] == SAMPLES


def test_every_message_kind_is_distinct_and_has_its_blob_field() -> None:
    classes = [c for c in vars(messages).values()
               if dataclasses.is_dataclass(c) and hasattr(c, "KIND")]
    assert len({c.KIND for c in classes}) == len(classes)
    for c in classes:
        names = [f.name for f in dataclasses.fields(c)]
        assert c.BLOB == "" or c.BLOB in names, c


def test_a_frame_of_the_wrong_shape_is_refused_by_both_sides() -> None:
    meta = json.dumps({"job": "seven", "grace_s": 1}).encode()
    with pytest.raises(frames.FrameError, match="Stop"):
        wire.decode(KINDS, messages.Stop.KIND, meta, b"")
    with pytest.raises(frames.FrameError, match="unknown frame kind 99"):
        frames.decode(KINDS, 99, b"{}", b"")
    with pytest.raises(frames.FrameError, match="Stop"):
        frames.decode(KINDS, messages.Stop.KIND, b'{"nope": 1}', b"")
    with pytest.raises(frames.FrameError, match="over the limit"):
        frames.Deframer().feed(frames.HEAD.pack(2, frames.MAX_FRAME, 1))
    assert wire.decode_report(b"garbage") is None


def test_the_bootstrap_loads_the_sandbox_privately_without_shipyard_on_the_path(
        tmp_path: Path) -> None:
    probe = SANDBOX / "probe_for_tests.py"
    assert not probe.exists()
    code = ("import json, sys\n"
            "def main(argv):\n"
            "    import importlib.util as u\n"
            "    print(json.dumps({'argv': argv, 'name': __name__, 'path': sys.path,\n"
            "        'nodes': u.find_spec('nodes') is not None,\n"
            "        'msgspec': 'msgspec' in sys.modules,\n"
            "        'isolated': sys.flags.isolated}))\n")
    probe.write_text(code)
    try:
        out = subprocess.run(launch.argv(sys.executable, "probe_for_tests", ["a", "b"]),
                             capture_output=True, text=True, cwd=tmp_path, timeout=30,
                             check=True).stdout
    finally:
        probe.unlink()
    got = json.loads(out)
    assert got["argv"] == ["a", "b"]
    assert got["name"] == "_shipyard_sandbox.probe_for_tests"
    assert got["isolated"] == 1 and got["msgspec"] is False
    root = str(SANDBOX.parents[1])
    assert not any(p in (root, "", str(tmp_path)) for p in got["path"]), got["path"]


def test_the_sandbox_words_a_deep_nesting_as_the_protocol_does() -> None:
    from nodes.sandbox import usercode
    from protocol.base import NESTED_TOO_DEEPLY

    assert usercode.NESTED_TOO_DEEPLY == NESTED_TOO_DEEPLY


_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text()
_json = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=20)


@given(_json)
@settings(max_examples=300, deadline=None)
def test_the_host_json_codec_writes_what_the_worker_msgspec_codec_writes(value: Any) -> None:
    from nodes.api.usercode import CODEC
    from nodes.sandbox.usercode import JsonCodec

    assert JsonCodec().encode(value) == CODEC.encode(value)


@pytest.mark.parametrize("value", [float("nan"), [1.0, {"a": float("inf")}],
                                   {"p": [0.5, float("-inf")]}])
def test_both_codecs_refuse_a_non_finite_result_with_the_same_words(value: Any) -> None:
    from nodes.api.usercode import CODEC, Failed
    from nodes.sandbox.usercode import JsonCodec, Refused

    with pytest.raises(Failed) as here:
        CODEC.encode(value)
    with pytest.raises(Refused) as there:
        JsonCodec().encode(value)
    assert (there.value.code, there.value.message) == (here.value.code, here.value.message)
    assert here.value.code == "bad_result"


MEETING_POINT = """\
import sys
import threading


def meet():
    try:  # both versions at this point at once, if nothing keeps them apart
        sys.modules["sy_test_meeting"].barrier.wait(timeout=1)
    except threading.BrokenBarrierError:
        pass


meet()
from helpers import VALUE
meet()  # neither leaves before both imported


def predict(features):
    return VALUE
"""


def test_two_versions_loaded_at_once_each_import_their_own_helpers(tmp_path: Path) -> None:
    """A worker loads generations on threads, two services' at the same time: each
    version's ``import helpers`` finds its own file, never the other's."""
    for version, value in (("v1", 1), ("v2", 2)):
        (tmp_path / version / "api").mkdir(parents=True)
        (tmp_path / version / "api" / "predict.py").write_text(MEETING_POINT)
        (tmp_path / version / "api" / "helpers.py").write_text(f"VALUE = {value}\n")
    answers = _load_at_once({v: (f"svc-{v}", v, tmp_path / v) for v in ("v1", "v2")})
    assert answers == {"v1": 1, "v2": 2}
    assert "helpers" not in sys.modules


def test_load_unpickles_a_model_whose_class_lives_in_a_helper_module(tmp_path: Path) -> None:
    """``load()`` runs while the version's helpers are importable: a pickled model whose
    class is defined beside the endpoint (pickle imports it by name) loads."""
    import pickle

    from nodes.sandbox.usercode import Generation

    (tmp_path / "api").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "api" / "modelkit.py").write_text(
        "class Scaler:\n    def __init__(self, k):\n        self.k = k\n\n"
        "    def apply(self, x):\n        return self.k * x\n")
    (tmp_path / "api" / "predict.py").write_text(
        "import pickle\n\n\ndef load(directory):\n"
        "    return pickle.loads((directory / 'models' / 'm.pkl').read_bytes())\n\n\n"
        "def predict(features, model):\n    return model.apply(features['x'])\n")
    sys.path.insert(0, str(tmp_path / "api"))
    try:
        import modelkit  # type: ignore[import-not-found]
        (tmp_path / "models" / "m.pkl").write_bytes(pickle.dumps(modelkit.Scaler(3)))
    finally:
        sys.path.remove(str(tmp_path / "api"))
        sys.modules.pop("modelkit", None)
    gen = Generation("svc", "v1", tmp_path, [("predict", "prediction", "api/predict.py",
                                              "predict")])
    assert gen.endpoints["predict"].call({"x": 2}) == 6
    assert "modelkit" not in sys.modules


LOAD_MEETING = """\
import sys
import threading

from {helpers} import VALUE


def load():
    sys.modules["sy_test_meeting"].barrier.wait(timeout=5)  # raises if alone


def predict(features):
    return VALUE
"""


def test_two_services_whose_helpers_have_different_names_load_side_by_side(
        tmp_path: Path) -> None:
    """Each ``load()`` waits for the other's: both finish only if neither holds the
    other back."""
    for service, value in (("a", 1), ("b", 2)):
        (tmp_path / service / "api").mkdir(parents=True)
        (tmp_path / service / "api" / "predict.py").write_text(
            LOAD_MEETING.format(helpers=f"helpers_{service}"))
        (tmp_path / service / "api" / f"helpers_{service}.py").write_text(f"VALUE = {value}\n")
    answers = _load_at_once({n: (n, "v1", tmp_path / n) for n in ("a", "b")})
    assert answers == {"a": 1, "b": 2}


def _load_at_once(generations: dict[str, tuple[str, str, Path]]) -> dict[str, Any]:
    """Load two generations (label: service, version, directory) on two threads at
    once, their code meeting at ``sy_test_meeting.barrier``; each one's ``predict``
    answer (or the error its load raised, as text)."""
    import threading
    import types

    from nodes.sandbox.usercode import Generation

    meeting = types.ModuleType("sy_test_meeting")
    meeting.barrier = threading.Barrier(len(generations))  # type: ignore[attr-defined]
    sys.modules["sy_test_meeting"] = meeting
    loaded: dict[str, Any] = {}

    def load(label: str) -> None:
        service, version, directory = generations[label]
        try:
            loaded[label] = Generation(service, version, directory,
                                       [("predict", "prediction", "api/predict.py",
                                         "predict")])
        except Exception as exc:
            loaded[label] = exc

    try:
        threads = [threading.Thread(target=load, args=(label,)) for label in generations]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    finally:
        del sys.modules["sy_test_meeting"]
    return {label: g.endpoints["predict"].call({}) if isinstance(g, Generation) else repr(g)
            for label, g in loaded.items()}
