"""The run's state: merging the actions' ``ctx.update`` deltas at the fan-in.

Every action works on its own unpickled copy of the state; what it changes comes
back as a delta (``{key: value}``). Deltas are applied in *plan order*, so the final
state never depends on which action finished first. Two nodes that no dependency path
orders may not both set a key (:class:`~actionpool.StateConflict`) unless a reducer
says how to combine them; nodes ordered by an edge overwrite in that order.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import StateConflict

__all__ = ["merge_state"]


def merge_state(
    initial: Any,
    deltas: Sequence[tuple[int, str, Mapping[str, Any]]],
    ancestors: Callable[[], list[int]],
    reducers: Mapping[str, Callable[[Any, Any], Any]] | None = None,
) -> Any:
    """Apply deltas to a copy of ``initial`` in plan (topological) order.

    Args:
        initial: the state the run started with (not modified). ``None`` starts empty.
        deltas: ``(plan index, node name, {key: value})`` of every node that succeeded
            and updated the state, in the plan's topological order (plan order, except
            where an ``after=`` name points forward).
        ancestors: returns, per plan index, a bitset of the indices of its ancestors;
            called only when two nodes set the same key without a reducer.
        reducers: ``{key: fn(current, new) -> combined}``, applied in plan order; the
            first update of a key absent from ``initial`` is taken as it is.

    Returns:
        The merged state (a new dict when ``initial`` is a mapping or ``None``).

    Raises:
        StateConflict: two nodes unordered by the plan set the same key without a
            reducer; names the key and both nodes.
        TypeError: the state is not a mapping but some node updated it.
    """
    reducers = dict(reducers or {})
    if not deltas:
        return copy.copy(initial) if initial is not None else {}
    if initial is None:
        state: dict[str, Any] = {}
    elif isinstance(initial, Mapping):
        state = dict(initial)
    else:
        raise TypeError(
            f"node {deltas[0][1]!r} called ctx.update, but the run's state is a "
            f"{type(initial).__name__}, not a mapping"
        )
    writers: dict[str, list[tuple[int, str]]] = {}
    for index, name, delta in deltas:
        for key in delta:
            writers.setdefault(key, []).append((index, name))
    anc: list[int] | None = None
    for key, ws in writers.items():
        if len(ws) < 2 or key in reducers:
            continue
        if anc is None:
            anc = ancestors()
        # ws is in topological order, so the writers are totally ordered exactly when
        # each one is an ancestor of the next.
        for (i, a), (j, b) in itertools.pairwise(ws):
            if not (anc[j] >> i) & 1:
                raise StateConflict(
                    f"nodes {a!r} and {b!r} both update state key {key!r} but neither runs"
                    f" after the other; order them with after= or pass"
                    f" reducers={{{key!r}: fn}} to runner.run",
                    key=key,
                    nodes=(a, b),
                )
    for _index, _name, delta in deltas:
        for key, value in delta.items():
            if key in reducers and key in state:
                state[key] = reducers[key](state[key], value)
            else:
                state[key] = value
    return state
