"""A test project with an API service: a prediction endpoint with a model artifact, a
function endpoint, and knobs to make a version slow, failing or crashing."""

from __future__ import annotations

from pathlib import Path

MANIFEST = """\
[project]
key = "{key}"

[api_services.{service}]
description = "Scoring for tests"

[api_services.{service}.endpoints.predict]
kind = "prediction"
code = "api/predict.py"
artifacts = ["models/"]

[api_services.{service}.endpoints.score]
kind = "function"
code = "api/score.py"
function = "score"
"""

PREDICT = """\
import ctypes
import json
import os
import subprocess
import sys
import time

from {helpers} import VERSION, label

LOAD_FAILS = {load_fails!r}
SLEEP = {sleep!r}
LOAD_SLEEP = {load_sleep!r}


def load(artifacts):
    if LOAD_SLEEP:
        time.sleep(LOAD_SLEEP)
    if LOAD_FAILS:
        raise RuntimeError("model file is corrupt")
    return json.loads((artifacts / "models" / "model.json").read_text())


def predict(features, model):
    if SLEEP:
        time.sleep(SLEEP)
    if features.get("crash_after"):
        time.sleep(features["crash_after"])
        os._exit(3)
    if features.get("crash"):
        os._exit(3)
    if features.get("segfault"):
        ctypes.string_at(0)
    if features.get("allocate_mb"):
        hog = bytearray(features["allocate_mb"] * 1024 * 1024)
        return {{"allocated": len(hog)}}
    if features.get("spawn"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        return {{"child": child.pid, "pid": os.getpid()}}
    if features.get("boom"):
        raise ValueError("boom: " + str(features["boom"]))
    if "float" in features:  # "nan", "inf": a result JSON cannot carry
        return {{"score": float(features["float"]), "scores": [1.0, float(features["float"])]}}
    x = float(features.get("x", 0))
    p = 1.0 if x * model["weight"] > 0.5 else 0.0
    return {{"prediction": label(p), "probas": {{"yes": p, "no": 1 - p}}, "version": VERSION,
            "pid": os.getpid()}}
"""

SCORE = """\
import time

from {helpers} import VERSION


def score(body):
    if isinstance(body, dict) and body.get("big"):  # a result of about that many bytes
        return {{"big": "x" * body["big"]}}
    if isinstance(body, dict) and body.get("sleep"):
        time.sleep(body["sleep"])
    if isinstance(body, dict) and "float" in body:
        return {{"value": float(body["float"])}}
    return {{"echo": body, "version": VERSION}}
"""

HELPERS = """\
VERSION = {version!r}


def label(p):
    return "yes" if p >= 0.5 else "no"
"""


def make_api_project(workspace: Path, key: str = "churn", service: str = "churn-api", *,
                     version: str = "1", load_fails: bool = False,
                     sleep: float = 0.0, load_sleep: float = 0.0,
                     helpers: str = "helpers") -> Path:
    """Write (or rewrite) the project; ``version`` shows in every reply.  ``helpers``:
    the name of the module the endpoints import (two services whose helpers share a
    name load one after the other in a worker)."""
    d = workspace / key
    (d / "api").mkdir(parents=True, exist_ok=True)
    (d / "models").mkdir(exist_ok=True)
    (d / "shipyard.toml").write_text(MANIFEST.format(key=key, service=service))
    (d / "api" / "predict.py").write_text(PREDICT.format(load_fails=load_fails, sleep=sleep,
                                                            load_sleep=load_sleep,
                                                            helpers=helpers))
    (d / "api" / "score.py").write_text(SCORE.format(helpers=helpers))
    (d / "api" / f"{helpers}.py").write_text(HELPERS.format(version=version))
    (d / "models" / "model.json").write_text('{"weight": 1.0}')
    (d / "notes.txt").write_text("not in the package\n")
    return d
