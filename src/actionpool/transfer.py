"""Pickling across the parent/worker boundary, with errors that name the culprit.

Everything a node sends or returns goes through :func:`dumps` / :func:`loads`
(cloudpickle, protocol 5), in both pools, so an io action gets a private copy of its
arguments and state exactly as a cpu action does. When pickling fails, the helpers
here find *which* argument, state key or return value failed and raise
:class:`~actionpool.SerializationError` naming it and the node. Large buffers travel
out of band through shared memory: :mod:`actionpool.shm`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cloudpickle

from .errors import SerializationError

if TYPE_CHECKING:
    from .shm import Arena

__all__ = [
    "Packed",
    "dumps",
    "dumps_call",
    "dumps_function",
    "dumps_state",
    "loads",
]

PROTOCOL = 5

Packed = tuple[bytes, tuple[tuple[str, int, int], ...]]
"""A pickle and the (segment name, offset, size) of each of its out-of-band buffers."""


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle (functions and lambdas by value when needed)."""
    data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    return data


loads = pickle.loads

# Types that pickle the same with the C pickler as with cloudpickle (never by value,
# never out of band): a call or value made only of them skips cloudpickle's Python
# Pickler, several times slower than the C one on a small call (docs/performance.md).
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})
_SHORT = 16  # items of a container worth checking one by one (cheaper than cloudpickle)


def _plain(obj: Any) -> bool:
    """An atom, or a short tuple, list or dict of atoms (no by-value or out-of-band
    pickling can be needed): a small result such as ``(start, end)`` or a few
    arguments."""
    t = type(obj)
    if t in _ATOMS:
        return True
    if (t is tuple or t is list) and len(obj) <= _SHORT:
        return all(type(x) in _ATOMS for x in obj)
    if t is dict and len(obj) <= _SHORT:
        return all(type(k) in _ATOMS and type(v) in _ATOMS for k, v in obj.items())
    return False


def _why(obj: Any, exc: BaseException) -> str:
    return f"{type(obj).__name__} cannot be pickled ({type(exc).__name__}: {exc})"


def dumps_function(node: str, fn: Any) -> bytes:
    """Pickle an action's function (by reference when importable, else by value).

    Pickle it once per run and pass the bytes to :func:`dumps_call`: a function defined
    in ``__main__`` or a notebook travels by value, and pickling its code for every
    node of a 5,000-node plan was the largest cost of dispatch.

    Raises:
        SerializationError: naming ``node``.
    """
    try:
        return dumps(fn)
    except Exception as exc:
        raise SerializationError(f"node {node!r}: the action {_why(fn, exc)}") from exc


def dumps_call(
    node: str,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    arena: Arena | None = None,
    fn_bytes: bytes | None = None,
) -> Packed:
    """Pickle an action call ``(function bytes, args, kwargs)``; large buffers go to ``arena``.

    Args:
        fn_bytes: ``dumps_function(node, fn)`` when the caller has it already.

    Raises:
        SerializationError: naming ``node`` and the action, positional argument (by
            index) or keyword argument (by name) that cannot be pickled.
    """
    if fn_bytes is None:
        fn_bytes = dumps_function(node, fn)
    plain = arena is None or not arena.has_refs
    if plain and all(map(_plain, args)) and all(map(_plain, kwargs.values())):
        return pickle.dumps((fn_bytes, args, dict(kwargs)), protocol=PROTOCOL), ()
    try:
        if arena is None:
            return dumps((fn_bytes, args, dict(kwargs))), ()
        return arena.dumps((fn_bytes, args, dict(kwargs)))
    except Exception as exc:  # noqa: BLE001 - pickling raises many types
        first = exc
    culprits: list[tuple[str, Any]] = []
    culprits += [(f"argument {i}", a) for i, a in enumerate(args)]
    culprits += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for what, obj in culprits:
        try:
            dumps(obj)
        except Exception as exc:
            raise SerializationError(f"node {node!r}: {what} {_why(obj, exc)}") from exc
    raise SerializationError(f"node {node!r}: the call cannot be pickled ({first})") from first


def dumps_state(state: Any, arena: Arena | None = None) -> Packed:
    """Pickle a run's state once; large buffers (arrays) go to ``arena``.

    Raises:
        SerializationError: naming the state key (for a mapping) that cannot be
            pickled; the caller adds the node that needed it.
    """
    try:
        return arena.dumps(state) if arena is not None else (dumps(state), ())
    except Exception as exc:  # noqa: BLE001
        first = exc
    if isinstance(state, Mapping):
        for key, value in state.items():
            try:
                dumps(value)
            except Exception as exc:
                raise SerializationError(f"state key {key!r}: {_why(value, exc)}") from exc
    raise SerializationError(f"the state {_why(state, first)}") from first
