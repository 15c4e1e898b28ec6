"""The match-verify-rewrite driver.

A rule names an anchor op type, a pattern and a `describe` step that verifies a match and turns
it into a small typed spec (e.g. AttentionSpec). A target turns the spec into new nodes. The
driver visits every anchor node once, so a pass is linear in the graph size; each rewrite is
built completely before it touches the graph, then applied at once, so a rule that fails halfway
leaves the graph as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import progress
from .graph import Graph, Node, Tensor, subgraphs
from .pattern import Match, Pattern, match


class Reject(Exception):
    """A candidate that does not qualify; the message says which condition failed."""


@dataclass(frozen=True)
class Rule:
    name: str  # the fusion family, counted in the report ("attention")
    anchor: str  # op type whose nodes are candidates
    pattern: Pattern
    root: Callable[[Graph, Node], Tensor]  # anchor node -> tensor the pattern is matched at
    describe: Callable[[Graph, Match], Any]  # match -> spec, its structure checked; raises Reject
    # (graph, match, spec, target) -> None: proves that what the target emits for the spec
    # computes what the matched subgraph did (onnx_fuse.verify); raises Reject if it does not.
    verify: Callable[[Graph, Match, Any, "Emitter"], None] | None = None
    # (graph, anchor) -> whether the anchor is a candidate at all (a Softmax over expert logits is
    # not attention): anchors it turns down are not reported.
    candidate: Callable[[Graph, Node], bool] | None = None
    # The anchor is itself a fused op that the spec describes (an exporter's ONNX Attention): a
    # target whose own op it is (Target.own_ops) keeps it as written, before it is even matched.
    written_op: bool = False


@dataclass
class Fused:
    rule: str
    anchor: str
    spec: Any
    nodes: list[str] = field(default_factory=list)  # names of the nodes the rewrite added
    position: int | None = None  # the anchor's index in the graph's node order when matched
    # What the target adds to the report about how it expressed the spec (Target.finish
    # fills it: which op, and why not a better one).
    details: dict = field(default_factory=dict)


@dataclass
class Unfused:
    anchor: str
    pattern: str
    reason: str
    position: int | None = None  # the anchor's index in the graph's node order

    def to_json(self) -> dict:
        entry = {"anchor": self.anchor, "pattern": self.pattern, "reason": self.reason}
        return entry if self.position is None else {**entry, "position": self.position}


@dataclass
class PassResult:
    fused: list[Fused] = field(default_factory=list)
    unfused: list[Unfused] = field(default_factory=list)
    # anchors a target keeps as written (already its own op: Rule.written_op), with the reason
    kept: list[Unfused] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.fused:
            counts[f.rule] = counts.get(f.rule, 0) + 1
        return counts


@dataclass
class PendingNode:
    """A node a rewrite will add: its tensors are the graph's own or new ones."""

    op: str
    inputs: list
    outputs: list
    attrs: dict
    domain: str


class Rewrite:
    """The new nodes of one fusion, collected first and applied to the graph all at once. A
    rewrite that is not applied (its spec was refused) is discarded: the names it took are given
    back, so a refused candidate leaves no trace in the output."""

    def __init__(self, graph: Graph, rule: str, scope: gs.Graph | None = None):
        self.graph, self.rule = graph, rule
        self.scope = scope if scope is not None else graph.gs  # where the new nodes go
        self.nodes: list[PendingNode] = []
        self._takeovers: list[Tensor] = []
        self._shared: dict = {}
        self._names: list[str] = []
        self._functions: dict[tuple[str, str], onnx.FunctionProto] = {}

    def _fresh(self, prefix: str) -> str:
        name = self.graph.fresh_name(prefix)
        self._names.append(name)
        return name

    def shared(self, key, build: Callable[[], Tensor]) -> Tensor:
        """A tensor computed once per pass and reused by every fusion that asks for `key`
        (e.g. one mask shared by all layers) in the same graph (a tensor of one If branch is not
        visible in the other)."""
        key = (id(self.scope), key)
        if key in self.graph.shared:
            return self.graph.shared[key]
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def const(self, prefix: str, array: np.ndarray) -> gs.Constant:
        return gs.Constant(self._fresh(prefix), np.asarray(array))

    def op(self, op_type: str, inputs: list, attrs: dict | None = None, *, dtype=None,
           shape=None, domain: str = "", outputs: list[Tensor] | None = None) -> Tensor:
        """Add a node; returns its (first) output. `outputs` reuses existing tensors, which the
        new node then produces in place of their old producer; a None among them is a new
        tensor (an op whose first output is new and whose others take over existing ones)."""
        given = [None] if outputs is None else outputs
        self._takeovers.extend(t for t in given if t is not None)
        outputs = [gs.Variable(self._fresh(f"{self.rule}/{op_type}_out"), dtype, shape)
                   if t is None else t for t in given]
        self.nodes.append(PendingNode(op_type, list(inputs), outputs, dict(attrs or {}), domain))
        return outputs[0]

    def function(self, proto: onnx.FunctionProto) -> None:
        """A model-local function the emitted nodes call (a custom op's body in standard ops,
        which onnxruntime runs and TensorRT inlines where no plugin takes the node)."""
        self._functions.setdefault((proto.domain, proto.name), proto)

    def discard(self) -> None:
        for name in self._names:
            self.graph.release_name(name)
        self._names.clear()

    def apply(self) -> list[Node]:
        for tensor in self._takeovers:
            old = self.graph.producer(tensor)
            if old is not None:
                old.outputs[old.outputs.index(tensor)] = gs.Variable(self.graph.fresh_name(tensor.name + "_dead"))
        created = []
        for pending in self.nodes:
            node = gs.Node(pending.op, self.graph.fresh_name(f"{self.rule}/{pending.op}"), pending.attrs,
                           pending.inputs, pending.outputs, domain=pending.domain or None)
            self.scope.nodes.append(node)
            self.graph.fused_by[node.name] = self.rule
            created.append(node)
        self.graph.shared.update(self._shared)
        for key, proto in self._functions.items():
            self.graph.functions.setdefault(key, proto)
        return created


def once(graph: Graph, key, compute: Callable[[], Any]):
    """compute() once per graph and key: the verification every layer would repeat (the same
    cos/sin tables, the same cache write). A Reject is remembered and raised again."""
    if key not in graph.memo:
        try:
            graph.memo[key] = compute()
        except Reject as reject:
            graph.memo[key] = reject
    if isinstance(graph.memo[key], Reject):
        raise graph.memo[key]
    return graph.memo[key]


def node_label(node: Node) -> str:
    return f"{node.op} '{node.name or node.outputs[0].name}'"


class Emitter(Protocol):
    """What run_rules needs of a target (targets.base.Target)."""

    name: str
    floor_opset: int
    domains: dict[str, int]
    own_ops: frozenset[tuple[str, str]]

    def refusal(self, spec) -> str | None: ...

    def spec_opset(self, spec) -> int: ...

    def emit(self, spec, rw: Rewrite) -> None: ...

    def finish(self, graph: Graph, result: "PassResult") -> None: ...


def run_rules(graph: Graph, rules: list[Rule], target: Emitter, apply: bool = True) -> PassResult:
    """Match every rule at every anchor; emit, verify and apply the ones the target expresses."""
    result = PassResult()
    consumed: set[int] = set()
    # Where each anchor sits in the graph (the report groups fusions by layer with it).
    position = {id(node): index for index, node in enumerate(graph.all_nodes)}
    for rule in rules:
        anchors = graph.nodes_of(rule.anchor)
        for count, anchor in enumerate(anchors, 1):
            if id(anchor) in consumed or rule.candidate is not None and not rule.candidate(graph, anchor):
                continue
            progress.phase("match", f"{rule.name} candidate {count} of {len(anchors)}")
            label, where = node_label(anchor), position.get(id(anchor))
            if rule.written_op and (anchor.domain or "", anchor.op) in target.own_ops:
                result.kept.append(Unfused(label, rule.name, f"already {anchor.op}, the op target "
                                                              f"{target.name} writes: left as it is", where))
                continue
            rewrite = Rewrite(graph, rule.name, graph.owner_of(anchor))
            try:
                found, spec = _candidate(graph, rule, anchor, consumed)
                reason = target.refusal(spec)
                if reason is not None:
                    raise Reject(reason)
                if rule.verify is not None:
                    progress.phase("verify", f"{rule.name} candidate {count} of {len(anchors)}")
                    rule.verify(graph, found, spec, target)
                target.emit(spec, rewrite)
            except Reject as reject:
                rewrite.discard()
                result.unfused.append(Unfused(label, rule.name, str(reject), where))
                continue
            created = rewrite.apply() if apply else []
            if not apply:
                rewrite.discard()
            consumed.update(id(n) for n in found.nodes)
            result.fused.append(Fused(rule.name, label, spec, [n.name for n in created], where))
    if apply and result.fused:
        target.finish(graph, result)
        tidy(graph.gs)
    return result


def _candidate(graph: Graph, rule: Rule, anchor: Node, consumed: set[int]) -> tuple[Match, Any]:
    """The rule's match at `anchor` and the spec it describes; Reject says why there is none."""
    found, why = match(rule.pattern, graph, rule.root(graph, anchor))
    if found is None:
        raise Reject(why)
    if any(id(n) in consumed for n in found.nodes):
        raise Reject("overlaps a fusion already made")
    return found, rule.describe(graph, found)


def tidy(g: gs.Graph) -> None:
    """Remove the nodes no graph output depends on and sort the rest topologically, keeping
    the existing order wherever it already is one: a node a rewrite appended lands just before
    its first consumer. Linear in the graph; graphs with subgraphs (If, Loop, Scan) or local
    functions go through graphsurgeon's general cleanup and toposort instead."""
    if g.functions or any(subgraphs(node) for node in g.nodes):
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        return
    for tensor in g.inputs:  # a graph input has no producer
        tensor.inputs.clear()
    used: set[int] = set()
    seen: set[int] = set()
    stack = list(g.outputs)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for producer in tensor.inputs:
            if id(producer) not in used:
                used.add(id(producer))
                stack.extend(producer.inputs)
    kept = []
    for node in g.nodes:
        if id(node) in used:
            kept.append(node)
        else:
            node.inputs.clear()
            node.outputs.clear()
    order: list[Node] = []
    state: dict[int, bool] = {}  # False while a node's inputs are being placed, True once placed
    for root in kept:
        if id(root) in state:
            continue
        state[id(root)] = False
        work = [(root, iter([p for t in root.inputs for p in t.inputs]))]
        while work:
            node, producers = work[-1]
            for producer in producers:
                placed = state.get(id(producer))
                if placed is None:
                    state[id(producer)] = False
                    work.append((producer, iter([p for t in producer.inputs for p in t.inputs])))
                    break
                if not placed:  # a cycle: let graphsurgeon report it
                    g.nodes = kept
                    g.toposort()
                    return
            else:
                work.pop()
                state[id(node)] = True
                order.append(node)
    g.nodes = order
