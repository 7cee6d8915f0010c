"""Pickling across the parent/worker boundary, with errors that name the culprit.

Everything a node sends or returns goes through :func:`dumps` / :func:`loads`
(cloudpickle, protocol 5), in both pools, so an io action gets a private copy of its
arguments and state exactly as a cpu action does. When pickling fails, the helpers
here find *which* argument, state key or return value failed and raise
:class:`~actionpool.SerializationError` naming it and the node.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import cloudpickle

from .errors import SerializationError

__all__ = ["dumps", "dumps_call", "dumps_state", "loads"]

PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle (functions and lambdas by value when needed)."""
    data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    return data


loads = pickle.loads


def _why(obj: Any, exc: BaseException) -> str:
    return f"{type(obj).__name__} cannot be pickled ({type(exc).__name__}: {exc})"


def dumps_call(node: str, fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    """Pickle an action call ``(fn, args, kwargs)``.

    Raises:
        SerializationError: naming ``node`` and the action, positional argument (by
            index) or keyword argument (by name) that cannot be pickled.
    """
    try:
        return dumps((fn, args, dict(kwargs)))
    except Exception as exc:  # noqa: BLE001 - pickling raises many types
        first = exc
    culprits: list[tuple[str, Any]] = [("the action", fn)]
    culprits += [(f"argument {i}", a) for i, a in enumerate(args)]
    culprits += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for what, obj in culprits:
        try:
            dumps(obj)
        except Exception as exc:
            raise SerializationError(f"node {node!r}: {what} {_why(obj, exc)}") from exc
    raise SerializationError(f"node {node!r}: the call cannot be pickled ({first})") from first


def dumps_state(state: Any) -> bytes:
    """Pickle a run's state once.

    Raises:
        SerializationError: naming the state key (for a mapping) that cannot be
            pickled; the caller adds the node that needed it.
    """
    try:
        return dumps(state)
    except Exception as exc:  # noqa: BLE001
        first = exc
    if isinstance(state, Mapping):
        for key, value in state.items():
            try:
                dumps(value)
            except Exception as exc:
                raise SerializationError(f"state key {key!r}: {_why(value, exc)}") from exc
    raise SerializationError(f"the state {_why(state, first)}") from first
