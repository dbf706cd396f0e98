"""The dataset/recipe DAG: validation and build plans.  Pure logic, no I/O except
``missing_files`` (a few ``stat`` calls; callers run it in a worker thread).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nodes.flow.errors import FlowError
from nodes.project.manifest import Manifest


@dataclass(frozen=True)
class Graph:
    """A validated DAG: who writes each dataset, and the recipes in dependency order."""

    manifest: Manifest
    producers: dict[str, str]           # dataset -> the recipe that writes it
    order: tuple[str, ...]              # every recipe, upstream first

    @classmethod
    def of(cls, manifest: Manifest) -> Graph:
        """Validate ``manifest``'s DAG.  Raises ``FlowError`` listing every unknown
        dataset, dataset written by two recipes, and cycle."""
        problems: list[str] = []
        datasets = manifest.datasets
        producers: dict[str, str] = {}
        for name, recipe in manifest.recipes.items():
            for kind, names in (("reads", recipe.inputs), ("writes", recipe.outputs)):
                for ds in names:
                    if ds not in datasets:
                        problems.append(f"recipe {name!r} {kind} unknown dataset {ds!r} "
                                        f"(no [datasets.{ds}] in the manifest)")
            for ds in recipe.outputs:
                other = producers.get(ds)
                if other is not None and other != name:
                    problems.append(f"dataset {ds!r} is written by two recipes: "
                                    f"{other!r} and {name!r}")
                else:
                    producers[ds] = name
        for sname, scenario in manifest.scenarios.items():
            for i, step in enumerate(scenario.steps):
                for kind, listed in (("build", step.build), ("check", step.check)):
                    for ds in listed or ():
                        if ds not in datasets:
                            problems.append(f"scenario {sname!r} step {i + 1} ({kind}) names "
                                            f"unknown dataset {ds!r}")
        if problems:
            raise FlowError(problems)
        upstream = {name: _upstream(manifest, producers, name) for name in manifest.recipes}
        cycles = _cycles(manifest, producers, upstream)
        if cycles:
            raise FlowError(cycles)
        return cls(manifest=manifest, producers=producers,
                   order=tuple(_topological(list(manifest.recipes), upstream)))

    def upstream(self, recipe: str) -> list[str]:
        """The recipes that write ``recipe``'s inputs."""
        return _upstream(self.manifest, self.producers, recipe)

    def check_targets(self, targets: Iterable[str]) -> None:
        """Raises ``FlowError`` naming every target that is not a declared dataset."""
        unknown = [t for t in targets if t not in self.manifest.datasets]
        if unknown:
            known = ", ".join(sorted(self.manifest.datasets)) or "none"
            raise FlowError([f"unknown dataset {t!r} (no [datasets.{t}] in the manifest; "
                             f"known: {known})" for t in unknown])

    def needed(self, targets: Iterable[str]) -> list[str]:
        """The recipes that building ``targets`` runs (or finds up to date), upstream
        first.  A source dataset (no recipe writes it) needs none."""
        wanted: set[str] = set()
        stack = [self.producers[t] for t in targets if t in self.producers]
        while stack:
            r = stack.pop()
            if r not in wanted:
                wanted.add(r)
                stack.extend(self.upstream(r))
        return [r for r in self.order if r in wanted]

    def sources(self, targets: Iterable[str]) -> list[str]:
        """The source datasets (no recipe writes them) that ``targets`` depend on."""
        out: list[str] = []
        for t in targets:
            if t not in self.producers and t not in out:
                out.append(t)
        for r in self.needed(targets):
            for ds in self.manifest.recipes[r].inputs:
                if ds not in self.producers and ds not in out:
                    out.append(ds)
        return out

    def missing_files(self, code_dir: Path, *, recipes: Iterable[str] | None = None,
                      scenarios: Iterable[str] | None = None) -> list[str]:
        """Problems with code files: the code of ``recipes`` and the python scripts of
        ``scenarios`` (None: all of them) that are not files under ``code_dir``
        (blocking)."""
        problems = []
        for name in self.manifest.recipes if recipes is None else recipes:
            recipe = self.manifest.recipes[name]
            if not (code_dir / recipe.code).is_file():
                problems.append(f"recipe {name!r}: code file {recipe.code!r} not found "
                                f"in {code_dir}")
        for sname in self.manifest.scenarios if scenarios is None else scenarios:
            for i, step in enumerate(self.manifest.scenarios[sname].steps):
                if step.python is not None and not (code_dir / step.python).is_file():
                    problems.append(f"scenario {sname!r} step {i + 1}: script "
                                    f"{step.python!r} not found in {code_dir}")
        return problems


def _upstream(manifest: Manifest, producers: dict[str, str], recipe: str) -> list[str]:
    out: list[str] = []
    for ds in manifest.recipes[recipe].inputs:
        p = producers.get(ds)
        if p is not None and p not in out:
            out.append(p)
    return out


def _cycles(manifest: Manifest, producers: dict[str, str],
            upstream: dict[str, list[str]]) -> list[str]:
    """A message per cycle, naming its recipes and datasets in data-flow order."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(upstream, white)
    found: list[str] = []
    seen: set[frozenset[str]] = set()

    def describe(cycle: list[str]) -> str:
        # cycle: [r0, r1, ..., r0] where r(i) reads something r(i+1) writes; print the
        # data flow, which runs the other way.
        flow = list(reversed(cycle))
        parts = [f"recipe {flow[0]!r}"]
        for writer, reader in itertools.pairwise(flow):
            ds = next(d for d in manifest.recipes[reader].inputs if producers.get(d) == writer)
            parts += [f"dataset {ds!r}", f"recipe {reader!r}"]
        return "dependency cycle: " + " -> ".join(parts)

    for start in upstream:
        if color[start] != white:
            continue
        path: list[str] = [start]
        iters = [iter(upstream[start])]
        color[start] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                color[path.pop()] = black
                iters.pop()
            elif color[nxt] == grey:
                cycle = [*path[path.index(nxt):], nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(describe(cycle))
            elif color[nxt] == white:
                color[nxt] = grey
                path.append(nxt)
                iters.append(iter(upstream[nxt]))
    return found


def _topological(recipes: list[str], upstream: dict[str, list[str]]) -> list[str]:
    """Upstream first; ties keep manifest order (so plans are stable)."""
    order: list[str] = []
    placed: set[str] = set()
    remaining = list(recipes)
    while remaining:
        ready = [r for r in remaining if all(u in placed for u in upstream[r])]
        for r in ready:
            order.append(r)
            placed.add(r)
        remaining = [r for r in remaining if r not in placed]
    return order
