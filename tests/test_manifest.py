"""shipyard.toml: the contract decodes, and every mistake names the file and the field."""

from __future__ import annotations

import pytest

from nodes.project.manifest import ManifestError, parse_manifest
from tests.projects import MANIFEST

GOOD = MANIFEST.format(key="churn") + """
[api_services.churn-api]
description = "Churn scoring"

[api_services.churn-api.endpoints.predict]
kind = "prediction"
code = "api/predict.py"
artifacts = ["models/"]

[api_services.churn-api.endpoints.score]
kind = "function"
code = "api/score.py"
function = "score"
"""


def test_the_documented_contract_decodes() -> None:
    m = parse_manifest(GOOD)
    assert m.project.key == "churn"
    assert m.datasets["raw"].ship is True and m.datasets["clean"].ship is False
    assert m.recipes["clean"].inputs == ["raw"] and m.recipes["clean"].outputs == ["clean"]
    assert m.scenarios["nightly"].steps[0].build == ["clean"]
    assert m.scenarios["nightly"].triggers[0].cron == "0 2 * * *"
    ep = m.api_services["churn-api"].endpoints
    assert ep["predict"].artifacts == ["models/"] and ep["score"].function == "score"


@pytest.mark.parametrize(("change", "field", "problem"), [
    (('ship = true', 'ship = "yes"'), "datasets.raw.ship", "expected bool, got str"),
    (('ship = true', 'shp = true'), "datasets.raw.shp", "unknown field"),
    (('key = "churn"', 'key = "Churn!"'), "project.key", "expected [a-z0-9][a-z0-9_-]*"),
    (('inputs = ["raw"]', 'inputs = "raw"'), "recipes.clean.inputs", "expected array"),
    (('path = "data/raw.csv"', 'path = "../../etc/passwd"'), "datasets.raw.path",
     "relative path inside the project"),
    (('steps = [{ build = ["clean"] }]', 'steps = [{ build = ["clean"], python = "x.py" }]'),
     "scenarios.nightly.steps[0]", "exactly one of build, check or python"),
    (('kind = "prediction"', 'kind = "sql"'), "api_services.churn-api.endpoints.predict.kind",
     "expected one of prediction, function"),
    (('[project]', '[projet]'), "project", "missing table [project]"),
])
def test_a_bad_manifest_names_the_file_and_the_field(change: tuple[str, str], field: str,
                                                     problem: str) -> None:
    text = GOOD.replace(*change, 1)
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, file="churn/shipyard.toml")
    err = info.value
    assert err.file == "churn/shipyard.toml"
    assert err.field == field
    assert problem in str(err)
    assert str(err).startswith(f"churn/shipyard.toml: {field}: ")


def test_invalid_toml_is_reported_with_its_position() -> None:
    with pytest.raises(ManifestError, match=r"invalid TOML: .*line 1"):
        parse_manifest("[project\nkey = 1", file="p/shipyard.toml")


def test_lenient_mode_accepts_fields_from_a_newer_version() -> None:
    text = GOOD.replace('ship = true', 'ship = true\nretention_days = 30')
    with pytest.raises(ManifestError):
        parse_manifest(text)
    assert parse_manifest(text, strict=False).datasets["raw"].ship is True


ENVS = """\
[project]
key = "churn"
code_env = "ml"

[code_envs.ml]
requirements = ["pandas>=2.2", "scikit-learn==1.5.2"]
python = "3.11"

[code_envs.nlp]
requirements_file = "requirements.txt"

[datasets.raw]
path = "data/raw.csv"

[recipes.train]
code = "recipes/train.py"
outputs = ["raw"]
code_env = "nlp"

[api_services.churn-api]
code_env = "ml"

[api_services.churn-api.endpoints.predict]
kind = "prediction"
code = "api/predict.py"
"""


def test_code_envs_decode_and_say_which_env_each_part_uses() -> None:
    m = parse_manifest(ENVS)
    assert m.code_envs["ml"].requirements == ["pandas>=2.2", "scikit-learn==1.5.2"]
    assert m.code_envs["ml"].python == "3.11"
    assert m.code_envs["nlp"].requirements_file == "requirements.txt"
    assert m.recipe_env("train") == "nlp" and m.service_env("churn-api") == "ml"
    assert m.bundle_envs() == {"nlp"}


@pytest.mark.parametrize(("change", "field", "problem"), [
    (('code_env = "ml"\n\n[code_envs.ml]', 'code_env = "gpu"\n\n[code_envs.ml]'),
     "project.code_env", "unknown code env 'gpu' (code_envs: ml, nlp)"),
    (('code_env = "nlp"', 'code_env = "nl"'), "recipes.train.code_env", "unknown code env 'nl'"),
    (('[api_services.churn-api]\ncode_env = "ml"', '[api_services.churn-api]\ncode_env = "m"'),
     "api_services.churn-api.code_env", "unknown code env 'm'"),
    (('python = "3.11"', 'python = "3.11"\nrequirements_file = "r.txt"'), "code_envs.ml",
     "expected exactly one of requirements or requirements_file"),
    (('requirements_file = "requirements.txt"', 'python = "3.12"'), "code_envs.nlp",
     "expected exactly one of requirements or requirements_file"),
    (('"scikit-learn==1.5.2"', '"pandas>>2"'), "code_envs.ml.requirements[1]",
     "invalid requirement 'pandas>>2': "),
    (('"pandas>=2.2"', '"-e ."'), "code_envs.ml.requirements[0]", "invalid requirement '-e .'"),
    (('"requirements.txt"', '"../shared/requirements.txt"'), "code_envs.nlp.requirements_file",
     "expected a relative path inside the project"),
    (('python = "3.11"', 'python = "3"'), "code_envs.ml.python",
     'expected a Python version like "3.11" (major.minor)'),
    (('python = "3.11"', 'python = 3.11'), "code_envs.ml.python", "expected str"),
    (('python = "3.11"', 'pyton = "3.11"'), "code_envs.ml.pyton", "unknown field"),
    (('[code_envs.ml]', '[code_envs."m l"]'), "code_envs.m l", "invalid code env name"),
])
def test_a_bad_code_env_names_the_file_and_the_field(change: tuple[str, str], field: str,
                                                     problem: str) -> None:
    text = ENVS.replace(*change, 1)
    assert text != ENVS
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, file="churn/shipyard.toml")
    assert info.value.field == field
    assert str(info.value).startswith(f"churn/shipyard.toml: {field}: ")
    assert problem in str(info.value)


def test_lenient_mode_accepts_code_env_fields_from_a_newer_version() -> None:
    text = ENVS.replace('python = "3.11"', 'python = "3.11"\nconda = true')
    with pytest.raises(ManifestError, match=r"code_envs\.ml\.conda: unknown field"):
        parse_manifest(text)
    assert parse_manifest(text, strict=False).code_envs["ml"].python == "3.11"
