"""What an API package holds, and which links refuse it (packing only; no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.design.api_packages import collect, pack
from nodes.project.files import LinksOutside
from nodes.project.manifest import load_manifest
from tests.apiproject import make_api_project

SERVICE = "churn-api"


def _collect(project: Path) -> list[str]:
    return collect(project, SERVICE, load_manifest(project).api_services[SERVICE])


def test_a_package_holds_the_manifest_code_helpers_and_artifacts(tmp_path: Path) -> None:
    project = make_api_project(tmp_path / "ws")
    assert _collect(project) == ["api/helpers.py", "api/predict.py", "api/score.py",
                                 "models/model.json", "shipyard.toml"]


def test_an_artifact_linked_out_of_the_project_refuses_the_package(tmp_path: Path) -> None:
    """Before, the file outside was packed and served; now nothing is packed."""
    project = make_api_project(tmp_path / "ws")
    outside = tmp_path / "host-secret.json"
    outside.write_text('{"weight": 9}')
    (project / "models" / "extra.json").symlink_to(outside)
    with pytest.raises(LinksOutside) as caught:
        pack(project, load_manifest(project), SERVICE, tmp_path / "p.tar", version="v1",
             created_by="t", notes="")
    assert f"models/extra.json -> {outside}" in caught.value.message
    assert caught.value.code == "bad_request"
    assert not (tmp_path / "p.tar").exists()


def test_every_kind_of_link_out_is_named(tmp_path: Path) -> None:
    """The artifacts folder itself, a helper module beside the code, and the manifest's
    named code file: each link that leaves the project is listed."""
    project = make_api_project(tmp_path / "ws")
    models = tmp_path / "shared-models"
    models.mkdir()
    (models / "model.json").write_text('{"weight": 1.0}')
    (project / "models" / "model.json").unlink()
    (project / "models").rmdir()
    (project / "models").symlink_to(models)
    lib = tmp_path / "lib.py"
    lib.write_text("X = 1\n")
    (project / "api" / "lib.py").symlink_to(lib)
    score = tmp_path / "score.py"
    score.write_text((project / "api" / "score.py").read_text())
    (project / "api" / "score.py").unlink()
    (project / "api" / "score.py").symlink_to(score)
    with pytest.raises(LinksOutside) as caught:
        _collect(project)
    assert sorted(link.split(" -> ")[0] for link in caught.value.links) == [
        "api/lib.py", "api/score.py", "models"]


def test_links_inside_the_project_and_unpacked_links_are_fine(tmp_path: Path) -> None:
    """A link to a file inside the project is packed as a copy; a link out of the project
    that the package would not hold anyway (not Python, beside the code) is not looked at."""
    project = make_api_project(tmp_path / "ws")
    (project / "models" / "latest.json").symlink_to("model.json")
    (project / "api" / "notes.txt").symlink_to(tmp_path / "anything.txt")
    files = _collect(project)
    assert "models/latest.json" in files and "api/notes.txt" not in files
