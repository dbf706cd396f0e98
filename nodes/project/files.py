"""Which files of a project are packed: exclusions, and symbolic links.

Bundles and API packages carry regular files only, and only from inside the project.
A link is judged by where it finally resolves (every hop, ``..`` included):

* it stays inside the project: it is packed as a copy of what it points to (a file, or
  a folder walked like any other).  ``models/latest.pkl -> v3.pkl`` is a common way to
  name the current model, and a copy is what a node needs: archives never hold links,
  and ``unpack`` refuses any that appear.
* it leaves the project: packing is refused, naming every such link and where it points
  (``LinksOutside``, a ``bad_request``).  Following it would publish a file from the
  Design node's disk that nobody put in the project; dropping it silently would ship a
  bundle that lacks a file the manifest names.
* a folder link that leads back to a folder it is inside (a loop) is refused too.

Links under an unshipped dataset or an excluded folder are never looked at: nothing
there is packed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from protocol.errors import BadRequest

# Never shipped: caches, virtualenvs, VCS folders, editor litter, local stack state.
EXCLUDED_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache",
    ".ruff_cache", "node_modules", ".ipynb_checkpoints", ".tox", ".shipyard", ".idea",
    ".vscode", ".cache",
})
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".swp", ".tmp")
EXCLUDED_MARKERS = (".sy-tmp-",)  # a recipe's output while it is being written
EXCLUDED_NAMES = frozenset({".DS_Store", "Thumbs.db"})

MAX_LISTED = 10


class LinksOutside(BadRequest):
    """Raised when a project holds links that point outside it (or loop); ``links`` lists
    each as ``"path -> target"``."""

    def __init__(self, project: str, links: list[str]) -> None:
        self.links = links
        shown = ", ".join(links[:MAX_LISTED]) + (
            f" (and {len(links) - MAX_LISTED} more)" if len(links) > MAX_LISTED else "")
        super().__init__(
            f"project {project}: {len(links)} symbolic link(s) point outside the project or "
            f"loop, and links are only packed when they stay inside it: {shown}; copy what "
            "they point to into the project instead", details={"links": links[:100]})


def excluded_file(name: str) -> bool:
    return (name in EXCLUDED_NAMES or name.endswith(EXCLUDED_SUFFIXES)
            or any(m in name for m in EXCLUDED_MARKERS))


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _link_text(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


class Walker:
    """Collects the regular files under folders of one project, following links that stay
    inside it and recording (in ``refused``) those that do not."""

    def __init__(self, project_dir: Path, *, skip: Callable[[PurePosixPath], str | None]
                 = lambda rel: None) -> None:
        self.root = project_dir.resolve()
        self.skip = skip  # a reason to leave this path out, or None
        self.refused: list[str] = []
        self.skipped: list[str] = []

    def check(self, rel: str) -> Path | None:
        """``rel`` (a path the manifest names) if it resolves inside the project; else the
        link on its way is recorded and None returned."""
        path = self.root / rel
        if _real(path).is_relative_to(self.root):
            return path
        # Name the first component that is a link leading out.
        here = self.root
        for part in PurePosixPath(rel).parts:
            here = here / part
            if here.is_symlink() and not _real(here).is_relative_to(self.root):
                self._refuse(here, "")
                return None
        self._refuse(path, "")
        return None

    def files(self, rel_dir: str = "", *, only: Callable[[str], bool] = lambda name: True,
              ) -> Iterator[tuple[str, Path]]:
        """``(relative path, path)`` of every file under ``rel_dir`` ("" = the project)
        whose name passes ``only`` (files it rejects are not looked at, links included)."""
        top = self.check(rel_dir) if rel_dir else self.root
        if top is None:
            return
        rel = PurePosixPath(rel_dir) if rel_dir else PurePosixPath()
        yield from self._walk(top, rel, frozenset({self.root, _real(top)}), only)

    def _refuse(self, path: Path, why: str) -> None:
        rel = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) \
            else str(path)
        self.refused.append(f"{rel} -> {_link_text(path)}{why}")

    def _walk(self, here: Path, rel: PurePosixPath, chain: frozenset[Path],
              only: Callable[[str], bool]) -> Iterator[tuple[str, Path]]:
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as exc:
            self.skipped.append(f"{rel.as_posix() or '.'}/ (unreadable: {exc.strerror})")
            return
        for entry in entries:
            path, sub = here / entry.name, rel / entry.name
            is_dir = entry.is_dir()  # follows links
            if is_dir and entry.name in EXCLUDED_DIRS:
                continue
            if not is_dir and (excluded_file(entry.name) or not only(entry.name)):
                continue
            if (reason := self.skip(sub)) is not None:
                self.skipped.append(f"{sub.as_posix()} ({reason})")
                continue
            if entry.is_symlink():
                real = _real(path)
                if not real.is_relative_to(self.root):
                    self._refuse(path, "")
                    continue
                if is_dir and any(c == real or c.is_relative_to(real) for c in chain):
                    self._refuse(path, " (a loop: it leads back to a folder it is in)")
                    continue
                if not is_dir and not real.is_file():
                    self.skipped.append(f"{sub.as_posix()} (link to nothing)")
                    continue
            if is_dir:
                yield from self._walk(path, sub, chain | {_real(path)}, only)
            elif entry.is_file():
                yield sub.as_posix(), path
            else:
                self.skipped.append(f"{sub.as_posix()} (not a regular file)")

    def raise_refused(self, project: str) -> None:
        """Raise ``LinksOutside`` if any link was refused."""
        if self.refused:
            raise LinksOutside(project, sorted(set(self.refused)))
