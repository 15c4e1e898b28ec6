"""A small declarative pattern language over ONNX graphs.

Patterns are written as expressions over ops, the way the math reads::

    scores = op.MatMul(var("q"), op.Transpose(var("k"), name="k_transpose"))
    probs = op.Softmax(either(op.Add(scores, var("mask"), commutative=True), scores))

and matched backwards from a tensor to its producers. Matching backtracks over alternatives
(`either`, `maybe`) and over the operand order of commutative ops; every way it fails is
recorded, so that a rejected candidate can say where it stopped matching.

Building blocks:
    var(name)                a tensor, captured under `name` (a second use must be the same tensor)
    const(name, predicate)   a tensor whose value folds from constants (see Graph.value)
    op.X(*inputs, ...)       a node of op type X (or other types via `ops=("Y",)`), with
                             attribute predicates, `name=` to capture the node (using the same
                             named pattern twice matches a DAG), `commutative=True`, `run=True`
                             (the inputs match any consecutive run of a variadic node's inputs,
                             Concat(a, b) inside Concat(p, a, b, q); the run's first index is
                             captured as "<name>:start")
    either(*patterns)        the first alternative that matches (with backtracking into the rest)
    maybe("Cast", p)         an optional single-input node in front of `p`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .graph import Graph, Node, Tensor


class Pattern:
    def match(self, state: "MatchState", tensor: Tensor) -> Iterator[None]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass
class Match:
    """A successful match: captured tensors, nodes and constant values, and the matched nodes."""

    captures: dict[str, Any]
    nodes: list[Node]

    def __getitem__(self, name: str):
        return self.captures[name]

    def get(self, name: str, default=None):
        return self.captures.get(name, default)


@dataclass
class MatchState:
    graph: Graph
    captures: dict[str, Any] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    best_failure: tuple[int, str] = (-1, "")

    def fail(self, reason: str) -> None:
        # The failure reached with the most nodes matched is the one worth reporting.
        if len(self.nodes) > self.best_failure[0]:
            self.best_failure = (len(self.nodes), reason)

    def bind(self, name: str, value) -> bool:
        """Capture `value`; False if `name` is already bound to something else."""
        if name in self.captures:
            bound = self.captures[name]
            if bound is value or (isinstance(bound, np.ndarray) and _same_array(bound, value)):
                return True
            self.fail(f"'{name}' must be the same tensor at every use")
            return False
        self.captures[name] = value
        return True

    def match_all(self, patterns: list[Pattern], tensors: list[Tensor]) -> Iterator[None]:
        if not patterns:
            yield
            return
        for _ in patterns[0].match(self, tensors[0]):
            yield from self.match_all(patterns[1:], tensors[1:])


def _same_array(a, b) -> bool:
    return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.all(a == b))


def _label(node: Node) -> str:
    return f"{node.op} '{node.name or node.outputs[0].name}'"


class Var(Pattern):
    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, state, tensor):
        if self.name is None:
            yield
            return
        was_bound = self.name in state.captures
        if state.bind(self.name, tensor):
            yield
            if not was_bound:
                del state.captures[self.name]

    def describe(self):
        return self.name or "_"


class Const(Pattern):
    def __init__(self, name: str | None, predicate: Callable[[np.ndarray], bool] | None = None):
        self.name, self.predicate = name, predicate

    def match(self, state, tensor):
        value = state.graph.value(tensor)
        if value is None:
            state.fail(f"'{tensor.name}' is not a constant")
            return
        if self.predicate is not None and not self.predicate(value):
            state.fail(f"constant '{tensor.name}' has an unexpected value")
            return
        if self.name is None:
            yield
            return
        was_bound = self.name in state.captures
        if state.bind(self.name, value):
            state.captures.setdefault(f"{self.name}:tensor", tensor)
            yield
            if not was_bound:
                del state.captures[self.name]
                state.captures.pop(f"{self.name}:tensor", None)

    def describe(self):
        return f"const {self.name or ''}".strip()


class OpPattern(Pattern):
    def __init__(self, op_types: tuple[str, ...], inputs: list[Pattern], attrs: dict,
                 name: str | None, commutative: bool, domain: str, run: bool = False):
        self.op_types, self.inputs, self.attrs = op_types, inputs, attrs
        self.name, self.commutative, self.domain, self.run = name, commutative, domain, run

    def match(self, state, tensor):
        node = state.graph.producer(tensor)
        wanted = "|".join(self.op_types)
        if self.name is not None and self.name in state.captures:
            # A named node met again (a DAG, e.g. Where(IsNaN(p), 0, p)): it must be the same.
            if state.captures[self.name] is node:
                yield
            else:
                state.fail(f"'{tensor.name}' is not the output of the {self.name} node seen before")
            return
        if node is None:
            state.fail(f"'{tensor.name}' is a graph input or constant, not the output of {wanted}")
            return
        if node.op not in self.op_types or (node.domain or "") != self.domain:
            state.fail(f"'{tensor.name}' is produced by {_label(node)}, expected {wanted}")
            return
        if node in state.nodes:  # the same node reached twice along one match: no
            state.fail(f"{_label(node)} is reached twice")
            return
        if len(node.inputs) < len(self.inputs):
            state.fail(f"{_label(node)} has {len(node.inputs)} inputs, expected {len(self.inputs)}")
            return
        for key, expected in self.attrs.items():
            actual = node.attrs.get(key)
            ok = expected(actual) if callable(expected) else actual == expected
            if not ok:
                state.fail(f"{_label(node)} has {key}={actual!r}")
                return
        if self.name is not None and not state.bind(self.name, node):
            return
        state.nodes.append(node)
        orders = [self.inputs]
        if self.commutative and len(self.inputs) == 2:
            orders.append(self.inputs[::-1])
        starts = range(len(node.inputs) - len(self.inputs) + 1) if self.run else [0]
        for start in starts:
            if self.run:
                state.captures[f"{self.name}:start"] = start
            for order in orders:
                yield from state.match_all(list(order), list(node.inputs[start: start + len(order)]))
        state.captures.pop(f"{self.name}:start", None)
        state.nodes.pop()
        if self.name is not None:
            del state.captures[self.name]

    def describe(self):
        return "|".join(self.op_types)


class Either(Pattern):
    def __init__(self, *alternatives: Pattern):
        self.alternatives = alternatives

    def match(self, state, tensor):
        for alternative in self.alternatives:
            yield from alternative.match(state, tensor)

    def describe(self):
        return " or ".join(a.describe() for a in self.alternatives)


def _as_pattern(p) -> Pattern:
    return Var(p) if isinstance(p, str) or p is None else p


class _OpBuilder:
    """`op.MatMul(a, b)` builds an OpPattern; `op.Mul(a, b, commutative=True)` tries both orders."""

    def __getattr__(self, op_type: str):
        def build(*inputs, name=None, commutative=False, domain="", ops=(), run=False, **attrs):
            return OpPattern((op_type, *ops), [_as_pattern(i) for i in inputs], attrs,
                             name, commutative, domain, run)
        return build


op = _OpBuilder()


def var(name: str | None = None) -> Var:
    return Var(name)


def const(name: str | None = None, predicate=None) -> Const:
    return Const(name, predicate)


def either(*alternatives) -> Either:
    return Either(*[_as_pattern(a) for a in alternatives])


def maybe(op_type: str, inner, name: str | None = None, **attrs) -> Either:
    """An optional single-input `op_type` node in front of `inner`."""
    inner = _as_pattern(inner)
    return Either(OpPattern((op_type,), [inner], attrs, name, False, ""), inner)


def match(pattern: Pattern, graph: Graph, tensor: Tensor,
          accept: Callable[[Match], bool] | None = None) -> tuple[Match | None, str]:
    """First match of `pattern` at `tensor` that `accept` takes; else (None, why it failed)."""
    state = MatchState(graph)
    for _ in pattern.match(state, tensor):
        found = Match(dict(state.captures), list(state.nodes))
        if accept is None or accept(found):
            return found, ""
    return None, state.best_failure[1] or "no match"
