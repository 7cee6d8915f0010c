"""Plans: directed acyclic graphs of nodes, and the checks that run before anything runs.

A :class:`Plan` is built with :meth:`Plan.add`, which returns a :class:`Node`. An edge
``a -> b`` means "b needs a's result" (``a`` passed as an argument of ``b``, also
inside lists, tuples and dicts) or "b runs after a" (``after=[a]`` or ``after=["a"]``).
Names in ``after=`` may refer to nodes added later; they are resolved, and the graph
checked for cycles, by :meth:`Plan.graph`, which the runner calls before dispatching
anything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .action import ActionSpec, as_spec
from .errors import PlanError

__all__ = ["Graph", "Node", "Plan", "find_nodes", "resolve"]


class Node:
    """One call of an action inside a plan; returned by :meth:`Plan.add`.

    Pass a node as an argument of another node to use its value; use it as a key of
    a :class:`~actionpool.Report` to read its outcome. Nodes hash by identity.

    Attributes:
        index: position in the plan (plan order), from 0.
        name: unique within the plan.
        action: the node's :class:`~actionpool.ActionSpec`.
        args, kwargs: the call's arguments, nodes still in place.
    """

    __slots__ = ("_after", "_plan", "action", "args", "deps", "index", "join", "kwargs", "name")

    def __init__(
        self,
        plan: Plan,
        index: int,
        name: str,
        action: ActionSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deps: tuple[Node, ...],
        after: tuple[Node | str, ...],
    ) -> None:
        self._plan = plan
        self.index = index
        self.name = name
        self.action = action
        self.args = args
        self.kwargs = kwargs
        self.deps = deps  # nodes whose values are arguments
        self._after = after
        self.join: tuple[str, int] | None = None  # ("race", 1) / ("quorum", k)

    def __repr__(self) -> str:
        return f"<Node {self.name!r} #{self.index} {self.action.name}>"


def find_nodes(obj: Any, found: list[Node]) -> None:
    """Append every :class:`Node` inside ``obj`` (lists, tuples, dicts, recursively)."""
    if isinstance(obj, Node):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            find_nodes(item, found)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            find_nodes(key, found)
            find_nodes(item, found)


def resolve(obj: Any, value_of: Callable[[Node], Any]) -> Any:
    """A copy of ``obj`` with every node replaced by ``value_of(node)``.

    Containers without nodes are returned as they are (no copy).
    """
    if isinstance(obj, Node):
        return value_of(obj)
    if isinstance(obj, (list, tuple)):
        items = [resolve(item, value_of) for item in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        if type(obj) is list:
            return items
        if type(obj) is tuple:
            return tuple(items)
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return _rebuilt(obj, items)
    if isinstance(obj, dict):
        pairs = [(resolve(k, value_of), resolve(v, value_of)) for k, v in obj.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, obj.items(), strict=True)):
            return obj
        if type(obj) is dict:
            return dict(pairs)
        # a dict subclass (defaultdict, OrderedDict...): a shallow copy keeps its type
        # and extra state (a defaultdict's factory), then takes the resolved items
        new = copy.copy(obj)
        new.clear()
        new.update(pairs)
        return new
    return obj


def _rebuilt(obj: list[Any] | tuple[Any, ...], items: list[Any]) -> Any:
    """A list/tuple subclass holding ``items``, keeping its type when it can."""
    if isinstance(obj, list):
        new = copy.copy(obj)
        new[:] = items
        return new
    try:
        return type(obj)(items)
    except TypeError:
        return tuple(items)


@dataclass(frozen=True)
class Graph:
    """A checked plan: resolved edges, ready for the scheduler.

    Attributes:
        nodes: every node, in plan order.
        deps: for each node index, the sorted indices of the nodes it waits for.
        dependents: for each node index, the indices of the nodes waiting for it.
        order: a topological order of node indices (plan order where edges allow).
    """

    nodes: tuple[Node, ...]
    deps: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]

    def ancestors(self) -> list[int]:
        """For each node index, a bitset (int) of the indices of all its ancestors."""
        anc = [0] * len(self.nodes)
        for i in self.order:
            bits = 0
            for d in self.deps[i]:
                bits |= anc[d] | (1 << d)
            anc[i] = bits
        return anc


class Plan:
    """A directed acyclic graph of action calls (nodes).

    Example::

        plan = ap.Plan()
        parts = [plan.add(simulate, i, name=f"sim{i}") for i in range(8)]
        total = plan.add(sum, parts)            # fan-in: waits for all eight
        plan.add(notify, after=["sim0"])        # ordering without data

    Build a plan in one thread; run it with :meth:`Runner.run` as often as you like.
    """

    def __init__(self) -> None:
        self._nodes: list[Node] = []
        self._by_name: dict[str, Node] = {}
        self._auto_names: dict[str, int] = {}

    def add(
        self,
        fn: Callable[..., Any] | ActionSpec,
        /,
        *args: Any,
        name: str | None = None,
        after: Iterable[Node | str] | Node | str | None = None,
        **kwargs: Any,
    ) -> Node:
        """Add one call of ``fn`` to the plan.

        Args:
            fn: an action (``@ap.action``) or any callable (kind ``"cpu"``).
            *args: its positional arguments. A :class:`Node` among them (also inside
                lists, tuples and dicts) is an edge, and is replaced by that node's
                value when this node runs.
            **kwargs: its keyword arguments, with nodes as in ``args``.
            name: a unique name for the node; by default the action's name, with
                ``#1``, ``#2``... appended to repeats.
            after: nodes or node names this node runs after, without using their
                values. Names may refer to nodes added later.

        Returns:
            Node: the new node.

        Raises:
            PlanError: ``fn`` is not callable, ``name`` is taken or not a string, or an
                argument or ``after`` entry is a node of another plan, or ``after``
                holds something that is neither a node nor a name.
        """
        try:
            spec = as_spec(fn)
        except TypeError as exc:
            raise PlanError(f"node {name or fn!r}: {exc}") from None
        if name is None:
            name = self._auto_name(spec.name)
        elif not isinstance(name, str) or not name:
            raise PlanError(f"node name must be a non-empty string, got {name!r}")
        elif name in self._by_name:
            raise PlanError(f"node name {name!r} is already used by {self._by_name[name]!r}")
        found: list[Node] = []
        find_nodes(args, found)
        find_nodes(kwargs, found)
        for dep in found:
            if dep._plan is not self:
                raise PlanError(f"node {name!r}: argument {dep!r} belongs to another plan")
        if after is None:
            after_t: tuple[Node | str, ...] = ()
        elif isinstance(after, (Node, str)):
            after_t = (after,)
        else:
            try:
                after_t = tuple(after)
            except TypeError:
                raise PlanError(
                    f"node {name!r}: after= takes a node, a name or a list of them,"
                    f" got {type(after).__name__} {after!r}"
                ) from None
        for a in after_t:
            if isinstance(a, Node):
                if a._plan is not self:
                    raise PlanError(f"node {name!r}: after= entry {a!r} belongs to another plan")
            elif not isinstance(a, str):
                raise PlanError(
                    f"node {name!r}: after= takes nodes or node names, got {type(a).__name__} {a!r}"
                )
        deps = tuple(dict.fromkeys(found))
        node = Node(self, len(self._nodes), name, spec, args, kwargs, deps, after_t)
        self._nodes.append(node)
        self._by_name[name] = node
        return node

    def race(self, nodes: Iterable[Node], *, name: str | None = None) -> Node:
        """A node whose value is the value of the first of ``nodes`` to succeed.

        The moment one input succeeds, the race succeeds and every input still
        pending or running is cancelled (a running cpu input's worker is killed);
        those end ``CANCELLED`` and do not count against the run's status. A failed
        input does not win. If every input fails, the race fails.

        Raises:
            PlanError: ``nodes`` is empty or holds something that is not a node of
                this plan.
        """
        return self._join("race", 1, nodes, name)

    def quorum(self, k: int, nodes: Iterable[Node], *, name: str | None = None) -> Node:
        """A node whose value is the list of the first ``k`` successes among ``nodes``.

        Values are in completion order. Once ``k`` inputs succeeded, the rest are
        cancelled as in :meth:`race`; once fewer than ``k`` can still succeed, the
        quorum fails.

        Raises:
            PlanError: ``k`` is not between 1 and ``len(nodes)``, or ``nodes`` holds
                something that is not a node of this plan.
        """
        return self._join("quorum", k, nodes, name)

    def _join(self, kind: str, k: int, nodes: Iterable[Node], name: str | None) -> Node:
        label = name or kind
        inputs = tuple(nodes) if not isinstance(nodes, Node) else (nodes,)
        if not inputs:
            raise PlanError(f"{kind} {label!r}: needs at least one input node")
        for n in inputs:
            if not isinstance(n, Node) or n._plan is not self:
                raise PlanError(f"{kind} {label!r}: {n!r} is not a node of this plan")
        if len(set(inputs)) != len(inputs):
            raise PlanError(f"{kind} {label!r}: an input node is given twice")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(inputs):
            raise PlanError(
                f"{kind} {label!r}: k must be an int from 1 to {len(inputs)} (the number of"
                f" inputs), got {k!r}"
            )
        node = self.add(_JOINS[kind], name=name, after=inputs)
        node.join = (kind, k)
        return node

    def _auto_name(self, base: str) -> str:
        n = self._auto_names.get(base, 0)
        name = base if n == 0 else f"{base}#{n}"
        while name in self._by_name:
            n += 1
            name = f"{base}#{n}"
        self._auto_names[base] = n + 1
        return name

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node, in plan order."""
        return tuple(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(tuple(self._nodes))

    def __getitem__(self, name: str) -> Node:
        """The node called ``name``.

        Raises:
            KeyError: no such node.
        """
        return self._by_name[name]

    def __contains__(self, item: object) -> bool:
        if isinstance(item, Node):
            return item._plan is self
        return item in self._by_name

    def __repr__(self) -> str:
        return f"<Plan of {len(self._nodes)} nodes>"

    def graph(self) -> Graph:
        """Resolve ``after=`` names and check the plan; called before a run.

        Returns:
            Graph: the graph of the plan.

        Raises:
            PlanError: an ``after=`` name that no node has (naming the node and the
                name), or a cycle (naming the nodes on it, in order).
        """
        n = len(self._nodes)
        deps: list[list[int]] = []
        for node in self._nodes:
            ids = {d.index for d in node.deps}
            for a in node._after:
                if isinstance(a, str):
                    target = self._by_name.get(a)
                    if target is None:
                        raise PlanError(
                            f"node {node.name!r}: after= names unknown node {a!r}"
                            + _suggest(a, self._by_name)
                        )
                    ids.add(target.index)
                else:
                    ids.add(a.index)
            if node.index in ids:
                raise PlanError(f"cycle: node {node.name!r} runs after itself")
            deps.append(sorted(ids))
        dependents: list[list[int]] = [[] for _ in range(n)]
        for i, ds in enumerate(deps):
            for d in ds:
                dependents[d].append(i)
        # Kahn's algorithm; a heap keeps plan order among ready nodes.
        import heapq

        indegree = [len(ds) for ds in deps]
        heap = [i for i in range(n) if indegree[i] == 0]
        heapq.heapify(heap)
        order: list[int] = []
        while heap:
            i = heapq.heappop(heap)
            order.append(i)
            for j in dependents[i]:
                indegree[j] -= 1
                if indegree[j] == 0:
                    heapq.heappush(heap, j)
        if len(order) < n:
            raise PlanError("cycle: " + " -> ".join(self._find_cycle(deps, indegree)))
        return Graph(
            nodes=tuple(self._nodes),
            deps=tuple(tuple(ds) for ds in deps),
            dependents=tuple(tuple(ds) for ds in dependents),
            order=tuple(order),
        )

    def _find_cycle(self, deps: list[list[int]], indegree: list[int]) -> list[str]:
        # Every node left with indegree > 0 waits on another such node: walk the
        # "waits for" edges until a node repeats; that loop is a cycle.
        start = next(i for i, k in enumerate(indegree) if k > 0)
        seen: dict[int, int] = {}
        path: list[int] = []
        i = start
        while i not in seen:
            seen[i] = len(path)
            path.append(i)
            i = next(d for d in deps[i] if indegree[d] > 0)
        cycle = path[seen[i] :]
        cycle.reverse()  # print in run order: a -> b means b runs after a
        names = [self._nodes[k].name for k in cycle]
        return [*names, names[0]]


def _race() -> None:
    """Placeholder action of race nodes: they are decided by the scheduler, never run."""


def _quorum() -> None:
    """Placeholder action of quorum nodes: they are decided by the scheduler, never run."""


_JOINS = {
    "race": ActionSpec(_race, name="race"),
    "quorum": ActionSpec(_quorum, name="quorum"),
}


def _suggest(name: str, known: dict[str, Node]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
