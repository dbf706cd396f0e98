"""The project manifest, ``shipyard.toml``: what a project is made of.

Decoded with msgspec.  Errors name the file, the field and what was expected::

    churn/shipyard.toml: datasets.raw.ship: expected bool, got str

``load_manifest(..., strict=True)`` (the Design node, where people write manifests) also
refuses unknown fields, so a typo like ``shp = true`` is caught; nodes that activate a
bundle read it with ``strict=False``, so a bundle made by a newer Design node still
activates on an older node.

The contract::

    [project]
    key = "churn"                    # [a-z0-9][a-z0-9_-]*
    name = "Churn prediction"

    [datasets.raw]
    path = "data/raw.csv"            # relative to the project
    ship = true                      # include this dataset's file in bundles
    checks = [{ metric = "row_count", min = 1, soft_min = 100 }]

    [recipes.clean]
    code = "recipes/clean.py"        # defines run(ctx)
    inputs = ["raw"]
    outputs = ["clean"]

    [scenarios.nightly]
    steps = [{ build = ["clean"] }, { check = ["clean"] }, { python = "scripts/x.py" }]
    triggers = [{ cron = "0 2 * * *" }, { on_activation = true }, { after = "other" }]

    [api_services.churn-api.endpoints.predict]
    kind = "prediction"              # or "function"
    code = "api/predict.py"
    artifacts = ["models/"]

    [code_envs.ml]                   # a locked Python environment for user code
    requirements = ["pandas>=2.2"]   # PEP 508; or requirements_file = "requirements.txt"
    python = "3.11"                  # optional; default: the Design node's Python

``project.code_env`` (and ``code_env`` of a recipe or an API service, which override it)
names the environment user code runs in; without one it runs in the node's own
interpreter.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
from packaging.requirements import InvalidRequirement, Requirement

from protocol.errors import BadRequest

MANIFEST = "shipyard.toml"

PROJECT_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
PYTHON_VERSION = re.compile(r"^[0-9]+\.[0-9]+\Z")


class ManifestError(BadRequest):
    """A manifest that cannot be used; the message names the file and the field."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file = file
        self.field = field
        self.problem = problem
        where = f"{file}: {field}: " if field else f"{file}: "
        super().__init__(where + problem, details={"file": file, "field": field})


class ProjectInfo(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    name: str = ""
    description: str = ""
    code_env: str | None = None  # the default code environment of the project's code


class CodeEnv(msgspec.Struct, frozen=True, kw_only=True):
    """A locked Python environment user code runs in (``[code_envs.<name>]``)."""

    requirements: list[str] | None = None  # PEP 508 requirement strings
    requirements_file: str | None = None  # or a requirements.txt inside the project
    python: str | None = None  # "3.11"; default: the Design node's Python version


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """A bound on a dataset metric.  Hard bounds (``min``/``max``) fail a run with ERROR;
    soft bounds (``soft_min``/``soft_max``) record a WARNING."""

    metric: str
    min: float | None = None
    max: float | None = None
    soft_min: float | None = None
    soft_max: float | None = None


class Dataset(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    ship: bool = False
    description: str = ""
    checks: list[Check] = []


class Recipe(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    inputs: list[str] = []
    outputs: list[str] = []
    timeout_s: float | None = None
    memory_mb: int | None = None
    code_env: str | None = None  # overrides the project's code_env


class Step(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One scenario step; exactly one of ``build``, ``check`` or ``python`` is set."""

    build: list[str] | None = None
    check: list[str] | None = None
    python: str | None = None
    force: bool = False
    name: str = ""

    @property
    def kind(self) -> str:
        return "build" if self.build is not None else "check" if self.check is not None \
            else "python"


class Trigger(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One scenario trigger; exactly one of ``cron``, ``on_activation`` or ``after``."""

    cron: str | None = None
    on_activation: bool = False
    after: str | None = None
    catch_up: bool | None = None  # cron only; default: the scenario's ``catch_up``

    @property
    def kind(self) -> str:
        return "cron" if self.cron is not None else "after" if self.after is not None \
            else "on_activation"


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    steps: list[Step]
    triggers: list[Trigger] = []
    params: dict[str, Any] = {}
    timeout_s: float | None = None
    catch_up: bool = True  # at most one catch-up run for cron firings missed while down
    description: str = ""


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    code: str
    artifacts: list[str] = []
    function: str | None = None
    description: str = ""


class ApiService(msgspec.Struct, frozen=True, kw_only=True):
    endpoints: dict[str, Endpoint]
    description: str = ""
    code_env: str | None = None  # overrides the project's code_env


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    project: ProjectInfo
    datasets: dict[str, Dataset] = {}
    recipes: dict[str, Recipe] = {}
    scenarios: dict[str, Scenario] = {}
    api_services: dict[str, ApiService] = {}
    code_envs: dict[str, CodeEnv] = {}

    def recipe_env(self, recipe: str) -> str | None:
        """The code environment recipe ``recipe`` runs in (None: the builtin one)."""
        return self.recipes[recipe].code_env or self.project.code_env

    def script_env(self) -> str | None:
        """The code environment scenario ``python`` steps run in."""
        return self.project.code_env

    def service_env(self, service: str) -> str | None:
        """The code environment API service ``service``'s endpoints run in."""
        return self.api_services[service].code_env or self.project.code_env

    def bundle_envs(self) -> set[str]:
        """Every code environment a bundle of this project uses."""
        used = {self.recipe_env(r) for r in self.recipes}
        if any(s.python is not None for sc in self.scenarios.values() for s in sc.steps):
            used.add(self.script_env())
        return {e for e in used if e}


ENDPOINT_KINDS = ("prediction", "function")


# -- decoding ---------------------------------------------------------------------------

def _field_path(msgspec_path: str) -> str:
    # "$.project.key" -> "project.key"; "$.steps[0].build" -> "steps[0].build"
    return msgspec_path.removeprefix("$").removeprefix(".")


def _convert(raw: Any, kind: Any, file: str, prefix: str) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        problem, _, where = text.rpartition(" - at `")
        if not problem:
            problem, where = text, "$"
        inner = _field_path(where.rstrip("`"))
        field = ".".join(p for p in (prefix, inner) if p).replace(".[", "[")
        problem = problem[0].lower() + problem[1:] if problem else problem
        raise ManifestError(file, field, problem.replace("`", "")) from None


def _struct_fields(cls: type[msgspec.Struct]) -> set[str]:
    return set(cls.__struct_fields__)


def _unknown(raw: Any, cls: type[msgspec.Struct], file: str, prefix: str) -> None:
    """Refuse keys ``cls`` does not have (strict mode), naming the first one."""
    if not isinstance(raw, dict):
        return
    known = _struct_fields(cls)
    for key in raw:
        if key not in known:
            expected = ", ".join(sorted(known))
            raise ManifestError(file, f"{prefix}.{key}" if prefix else key,
                                f"unknown field (expected one of: {expected})")


def _check_name(kind: str, name: str, file: str, prefix: str) -> None:
    if not NAME.match(name):
        raise ManifestError(file, prefix, f"invalid {kind} name {name!r}: expected letters, "
                                          "digits, '_' or '-'")


def _check_path(value: str, file: str, field: str) -> None:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts or "\\" in value:
        raise ManifestError(file, field, f"expected a relative path inside the project, "
                                         f"got {value!r}")


def parse_manifest(text: str | bytes, *, file: str = MANIFEST, strict: bool = True) -> Manifest:
    """Decode and validate manifest text.  Raises ``ManifestError``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(file, "", f"not UTF-8 text ({exc.reason})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(file, "", f"invalid TOML: {exc}") from None
    if "project" not in raw:
        raise ManifestError(file, "project", "missing table [project] (expected key = \"...\")")
    if strict:
        _unknown(raw, Manifest, file, "")
        _unknown(raw.get("project"), ProjectInfo, file, "project")
    project = _convert(raw["project"], ProjectInfo, file, "project")
    if not PROJECT_KEY.match(project.key):
        raise ManifestError(file, "project.key",
                            f"invalid key {project.key!r}: expected [a-z0-9][a-z0-9_-]*")

    def section(name: str, cls: type[msgspec.Struct]) -> dict[str, Any]:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ManifestError(file, name, f"expected a table of {cls.__name__.lower()}s, "
                                            f"got {type(table).__name__}")
        out: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{name}.{key}"
            _check_name("code env" if cls is CodeEnv else cls.__name__.lower(), key, file,
                        where)
            if not isinstance(value, dict):
                raise ManifestError(file, where, f"expected a table, got {type(value).__name__}")
            if strict:
                _unknown(value, cls, file, where)
                _strict_nested(value, cls, file, where)
            out[key] = _convert(value, cls, file, where)
        return out

    datasets = section("datasets", Dataset)
    recipes = section("recipes", Recipe)
    scenarios = section("scenarios", Scenario)
    services = section("api_services", ApiService)
    code_envs = section("code_envs", CodeEnv)
    manifest = Manifest(project=project, datasets=datasets, recipes=recipes,
                        scenarios=scenarios, api_services=services, code_envs=code_envs)
    _validate(manifest, file)
    return manifest


def _strict_nested(value: dict[str, Any], cls: type[msgspec.Struct], file: str,
                   where: str) -> None:
    nested: dict[str, type[msgspec.Struct]] = {"checks": Check, "steps": Step,
                                               "triggers": Trigger}
    for key, item_cls in nested.items():
        items = value.get(key)
        if key in _struct_fields(cls) and isinstance(items, list):
            for i, item in enumerate(items):
                _unknown(item, item_cls, file, f"{where}.{key}[{i}]")
    if cls is ApiService and isinstance(value.get("endpoints"), dict):
        for name, ep in value["endpoints"].items():
            _unknown(ep, Endpoint, file, f"{where}.endpoints.{name}")


def _validate(m: Manifest, file: str) -> None:
    for name, ds in m.datasets.items():
        _check_path(ds.path, file, f"datasets.{name}.path")
        for i, check in enumerate(ds.checks):
            if all(v is None for v in (check.min, check.max, check.soft_min, check.soft_max)):
                raise ManifestError(file, f"datasets.{name}.checks[{i}]",
                                    "expected at least one of min, max, soft_min, soft_max")
    for name, r in m.recipes.items():
        _check_path(r.code, file, f"recipes.{name}.code")
        if not r.outputs:
            raise ManifestError(file, f"recipes.{name}.outputs",
                                "expected at least one output dataset")
    for name, sc in m.scenarios.items():
        if not sc.steps:
            raise ManifestError(file, f"scenarios.{name}.steps", "expected at least one step")
        for i, step in enumerate(sc.steps):
            kinds = [k for k in ("build", "check", "python") if getattr(step, k) is not None]
            if len(kinds) != 1:
                raise ManifestError(file, f"scenarios.{name}.steps[{i}]",
                                    "expected exactly one of build, check or python")
            if step.python is not None:
                _check_path(step.python, file, f"scenarios.{name}.steps[{i}].python")
        for i, trig in enumerate(sc.triggers):
            kinds = [k for k, v in (("cron", trig.cron), ("after", trig.after),
                                    ("on_activation", trig.on_activation or None))
                     if v is not None]
            if len(kinds) != 1:
                raise ManifestError(file, f"scenarios.{name}.triggers[{i}]",
                                    "expected exactly one of cron, on_activation or after")
    for sname, svc in m.api_services.items():
        if not svc.endpoints:
            raise ManifestError(file, f"api_services.{sname}.endpoints",
                                "expected at least one endpoint")
        for ename, ep in svc.endpoints.items():
            where = f"api_services.{sname}.endpoints.{ename}"
            _check_name("endpoint", ename, file, where)
            if ep.kind not in ENDPOINT_KINDS:
                raise ManifestError(file, f"{where}.kind",
                                    f"expected one of {', '.join(ENDPOINT_KINDS)}, "
                                    f"got {ep.kind!r}")
            _check_path(ep.code, file, f"{where}.code")
            for j, art in enumerate(ep.artifacts):
                _check_path(art.rstrip("/") or art, file, f"{where}.artifacts[{j}]")
    _validate_envs(m, file)


def _validate_envs(m: Manifest, file: str) -> None:
    for name, env in m.code_envs.items():
        where = f"code_envs.{name}"
        if (env.requirements is None) == (env.requirements_file is None):
            raise ManifestError(file, where, "expected exactly one of requirements or "
                                             "requirements_file")
        for i, line in enumerate(env.requirements or []):
            check_requirement(line, file, f"{where}.requirements[{i}]")
        if env.requirements_file is not None:
            _check_path(env.requirements_file, file, f"{where}.requirements_file")
        if env.python is not None and not PYTHON_VERSION.match(env.python):
            raise ManifestError(file, f"{where}.python",
                                f"expected a Python version like \"3.11\" (major.minor), "
                                f"got {env.python!r}")
    refs = [("project.code_env", m.project.code_env)]
    refs += [(f"recipes.{n}.code_env", r.code_env) for n, r in m.recipes.items()]
    refs += [(f"api_services.{n}.code_env", s.code_env) for n, s in m.api_services.items()]
    for field, ref in refs:
        if ref is not None and ref not in m.code_envs:
            known = ", ".join(sorted(m.code_envs)) or "none; declare it as [code_envs." \
                                                      f"{ref}]"
            raise ManifestError(file, field, f"unknown code env {ref!r} (code_envs: {known})")


def check_requirement(line: str, file: str, field: str) -> Requirement:
    """Parse one PEP 508 requirement; ``ManifestError`` naming ``file`` and ``field``."""
    try:
        return Requirement(line)
    except InvalidRequirement as exc:
        problem = str(exc).splitlines()[0]
        raise ManifestError(file, field, f"invalid requirement {line!r}: {problem}") from None


def load_manifest(project_dir: Path, *, strict: bool = True) -> Manifest:
    """Read ``<project_dir>/shipyard.toml``.  Raises ``ManifestError``."""
    path = project_dir / MANIFEST
    label = f"{project_dir.name}/{MANIFEST}"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(label, "", "file not found") from None
    except OSError as exc:
        raise ManifestError(label, "", f"cannot read: {exc.strerror}") from None
    return parse_manifest(text, file=label, strict=strict)
