"""Celery canvas (chain, group, chord, nested) as workflow steps, one per task signature.

Example::

    from celery import chain, chord, group
    from baton_celery import Workflow

    canvas = chain(fetch.s(url), chord([parse.s(), index.s()], merge.s()))
    handle = Workflow.from_canvas(canvas, label="ingest").apply_async()
    handle.wait(timeout=60)
    handle.result()   # what Celery's own AsyncResult of the canvas would give

A step's input is recorded in its stored options (:data:`INPUT`): the names of the steps
whose results it gets as its first argument, as a name (one result) or a list (a group's
results, in order); :mod:`baton_celery.dispatch` reads them from the store when it
publishes the step. Immutable signatures (``.si()``) have none.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any, Union

from celery.canvas import Signature, _chain, chord, group

__all__ = ["INPUT", "RESULT", "CanvasStep", "Tail", "flatten", "translate"]

#: Stored option: the result structure a step gets as its first argument.
INPUT = "baton_input"
#: Stored option of a canvas workflow's first step: the structure of the canvas's result.
RESULT = "baton_result"
#: The option a user sets (``sig.set(step="name")``) to name the step.
STEP_NAME = "step"

#: A result structure: one step's name, or a list of structures (a group's results).
Tail = Union[str, list[Any]]


@dataclasses.dataclass(frozen=True)
class CanvasStep:
    name: str
    signature: Signature
    deps: tuple[str, ...]


def flatten(tail: Tail) -> Iterator[str]:
    """The step names of a result structure, in order."""
    if isinstance(tail, str):
        yield tail
    else:
        for part in tail:
            yield from flatten(part)


def translate(canvas: Any, error: type[Exception] = ValueError) -> tuple[list[CanvasStep], Tail]:
    """The steps of ``canvas`` in a valid order, and the structure of its result.

    Raises ``error`` naming the problem for what baton cannot express.
    """
    return _Translator(error).run(canvas)


def _unroll(sig: Any) -> Any:
    # Celery treats a group of one task as that task inside chains (maybe_unroll_group).
    if isinstance(sig, group) and len(sig.tasks) == 1:
        return sig.tasks[0]
    return sig


class _Translator:
    def __init__(self, error: type[Exception]) -> None:
        self.error = error
        self.steps: list[tuple[str | None, Signature, tuple[str, ...]]] = []

    def run(self, canvas: Any) -> tuple[list[CanvasStep], Tail]:
        tail = self.walk(canvas, None, "the canvas")
        named = self.name_steps()
        renamed = self.renamed(tail, named)
        steps = [
            CanvasStep(named[i], sig, tuple(named[int(d)] for d in deps))
            for i, (_, sig, deps) in enumerate(self.steps)
        ]
        for step in steps:
            if INPUT in step.signature.options:
                step.signature.options[INPUT] = self.renamed(step.signature.options[INPUT], named)
        return steps, renamed

    # Steps are first known by their index (as a string); names are given at the end,
    # once every user-chosen name is known, so a generated name never takes one of them.
    def renamed(self, tail: Tail, named: list[str]) -> Tail:
        if isinstance(tail, str):
            return named[int(tail)]
        return [self.renamed(t, named) for t in tail]

    def name_steps(self) -> list[str]:
        chosen = [n for n, _, _ in self.steps if n is not None]
        dupes = sorted({n for n in chosen if chosen.count(n) > 1})
        if dupes:
            raise self.error(f"duplicate step name {dupes[0]!r} given with .set(step=...)")
        taken = set(chosen)
        counts: collections.Counter[str] = collections.Counter()
        names = []
        for name, sig, _ in self.steps:
            if name is None:
                base = str(sig.task).rsplit(".", 1)[-1]
                while True:
                    counts[base] += 1
                    name = base if counts[base] == 1 else f"{base}#{counts[base]}"
                    if name not in taken:
                        break
                taken.add(name)
            names.append(name)
        return names

    def check_container(self, sig: Any, where: str) -> None:
        kind = "chain" if isinstance(sig, _chain) else type(sig).__name__
        if sig.args:
            raise self.error(f"{where}: partial arguments on a {kind} are not supported")
        for key in ("link", "link_error"):
            if sig.options.get(key):
                raise self.error(
                    f"{where}: {key} on a {kind} itself is not supported; "
                    "set it on the tasks it should follow"
                )

    def walk(self, sig: Any, incoming: Tail | None, where: str) -> Tail:
        if isinstance(sig, dict) and not isinstance(sig, Signature):
            sig = Signature.from_dict(sig)
        if isinstance(sig, _chain):
            self.check_container(sig, where)
            if not sig.tasks:
                raise self.error(f"{where}: an empty chain")
            tail = incoming
            for i, part in enumerate(sig.tasks):
                tail = self.walk(_unroll(part), tail, f"{where}, chain part {i}")
            assert tail is not None
            return tail
        if isinstance(sig, chord):
            self.check_container(sig, where)
            if sig.body is None:
                raise self.error(f"{where}: a chord without a body")
            header = self.walk(group(list(sig.tasks)), incoming, f"{where}, chord header")
            return self.walk(sig.body, header, f"{where}, chord body")
        if isinstance(sig, group):
            self.check_container(sig, where)
            if not sig.tasks:
                raise self.error(f"{where}: an empty group")
            tails: list[Any] = []
            for i, member in enumerate(sig.tasks):
                tail = self.walk(member, incoming, f"{where}, group member {i}")
                if isinstance(member, group):
                    tails.extend(tail)  # Celery unrolls a group inside a group
                else:
                    tails.append(tail)
            return tails
        if type(sig) is not Signature:
            kind = type(sig).__name__
            raise self.error(
                f"{where}: baton cannot express a {kind} ({sig!r}); "
                "expected a task signature, chain, group or chord"
            )
        return self.task(sig, incoming)

    def task(self, sig: Signature, incoming: Tail | None) -> str:
        sig = sig.clone()
        options = dict(sig.options)
        name = options.pop(STEP_NAME, None)
        if name is not None and (not isinstance(name, str) or not name):
            raise self.error(f"step names must be non-empty strings, got {name!r}")
        deps: tuple[str, ...] = ()
        if incoming is not None:
            deps = tuple(dict.fromkeys(flatten(incoming)))
            if not sig.immutable:
                options[INPUT] = incoming
        sig.options = options
        self.steps.append((name, sig, deps))
        return str(len(self.steps) - 1)
