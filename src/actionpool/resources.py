"""Worker resources: objects an action shares on purpose, made once per worker.

State is copied into every attempt; a resource (an HTTP session, a connection pool, a
loaded model, a lock) is not: it is made lazily by its factory, once per cpu worker
process, or once per runner for io actions (shared by the io threads), and closed
when that worker or runner ends. It is never pickled as a value, never part of the
state, never merged.

Data flow::

    Runner(resources={"db": make_db})
      pack(): check names and factories; pickle each factory once ─► payload (bytes)
        ├─ register(payload, factories): the runner's own registry, for its io threads
        └─ Scheduler.resources ─► Task.resources (actions that take a Context),
                                  or an argument of a map's chunk (maps._run_chunk)
    worker: a process, or an io thread of the runner
      _worker._prepare ─► view(payload, node) ─► registry_for(payload) ─► ctx.resources
      ctx.resources["db"] ─► ResourceRegistry.get: the factory, once (a lock per name)
    end: process_main's STOP ─► close_process_registries(); Runner.shutdown ─► close()

The payload is ``pickle((token, ((name, factory bytes), ...)))``; the token is drawn
per runner, so two runners with the same factories never share a registry in one
process, and a worker process keeps one registry per payload it has seen (a process
belongs to one runner: one). Factories are unpickled in the worker only when first
needed, each error naming its resource.

States of a resource in a registry: declared -> made -> closed. A factory that
raises leaves it declared (the next access calls it again); once the registry is
closed, nothing is made any more.

Concurrency contract. A registry is shared by the threads of its process (the io
threads of a runner; a cpu worker's action and the threads it starts). ``_made``
(name -> instance) is read without a lock (a dict read is atomic) and written only
under that name's lock in ``_locks``, which a creation holds while its factory runs,
so two threads never make the same resource twice. :meth:`ResourceRegistry.close`
sets ``_closed``, then takes every name's lock in turn (so that a creation in
progress ends and is seen), then closes what was made. Module state
(``_REGISTRIES``, ``_INHERITED``) changes only under ``_LOCK``. No lock is held while
another is taken, but a name's lock while the factory runs.
"""

from __future__ import annotations

import inspect
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .errors import ActionTimeout, ResourceError, SerializationError

__all__ = [
    "ResourceRegistry",
    "Resources",
    "close_process_registries",
    "pack",
    "register",
    "registry_for",
    "unregister",
    "view",
]

Factory = Callable[[], Any]


def pack(resources: Mapping[str, Factory] | None) -> bytes | None:
    """Check ``Runner(resources=...)`` and pickle its factories, once per runner.

    Args:
        resources: ``{name: factory}``, each factory a callable taking no arguments;
            None or an empty mapping: no resources.

    Returns:
        The payload that tasks carry to workers, or None when there are no resources.

    Raises:
        TypeError: ``resources`` is not a mapping, a name is not a str, or a factory
            is not callable or needs arguments (naming the resource).
        ValueError: a name is empty.
        SerializationError: a factory cannot be pickled (naming the resource): cpu
            workers make their own instances, so each factory travels to them.
    """
    from .transfer import dumps  # transfer sits above this module

    if resources is None:
        return None
    if not isinstance(resources, Mapping):
        raise TypeError(
            "resources must be a mapping of name -> factory (a callable taking no"
            f" arguments), got {type(resources).__name__}"
        )
    entries: list[tuple[str, bytes]] = []
    for name, factory in resources.items():
        if not isinstance(name, str):
            raise TypeError(f"resources: the name {name!r} must be a str")
        if not name:
            raise ValueError("resources: a resource's name must be a non-empty str")
        if not callable(factory):
            raise TypeError(
                f"resources[{name!r}] must be a factory (a callable taking no arguments),"
                f" got {factory!r}"
            )
        _check_no_arguments(name, factory)
        try:
            entries.append((name, dumps(factory)))
        except Exception as exc:
            raise SerializationError(
                f"resource {name!r}: its factory {factory!r} cannot be pickled"
                f" ({type(exc).__name__}: {exc}); cpu workers each make their own"
                " instance, so the factory must travel to them (define it at module level)"
            ) from exc
    if not entries:
        return None
    return pickle.dumps((os.urandom(8), tuple(entries)), protocol=5)


def _check_no_arguments(name: str, factory: Factory) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (some builtins): trust it
        return
    try:
        sig.bind()
    except TypeError as exc:
        raise TypeError(
            f"resources[{name!r}]: the factory must be callable with no arguments ({exc});"
            " bind them first (functools.partial, or a lambda)"
        ) from None


class ResourceRegistry:
    """The resources of one runner in one process: made on first use, closed once.

    Args:
        payload: what :func:`pack` returned.
        factories: the factories themselves, where they need no unpickling (the
            runner's own process); else each is unpickled from ``payload`` when its
            resource is first made.

    Attributes:
        names: the declared names, in declaration order.
        pid: the process that made this registry; a forked child never uses it.
    """

    __slots__ = ("_closed", "_factories", "_locks", "_made", "names", "pid")

    def __init__(self, payload: bytes, factories: Mapping[str, Factory] | None = None) -> None:
        _token, entries = pickle.loads(payload)
        self.pid = os.getpid()
        self.names: tuple[str, ...] = tuple(name for name, _ in entries)
        self._factories: dict[str, Factory | bytes] = dict(entries)
        if factories is not None:
            self._factories.update(factories)
        self._locks = {name: threading.Lock() for name in self.names}
        self._made: dict[str, Any] = {}
        self._closed = False

    def get(self, name: str, node: str) -> Any:
        """The resource ``name``, made now by its factory if this is its first use.

        Raises:
            KeyError: ``name`` was not declared (naming the declared ones).
            ResourceError: its factory raised, or could not be unpickled here, or the
                registry is closed.
        """
        try:
            return self._made[name]
        except KeyError:
            pass
        lock = self._locks.get(name)
        if lock is None:
            raise KeyError(unknown(name, node, self.names))
        with lock:
            if name in self._made:  # another thread made it while we waited
                return self._made[name]
            if self._closed:
                raise ResourceError(
                    f"resource {name!r} of node {node!r}: the resources are closed"
                    " (their runner or worker is closing)"
                )
            factory = self._factories[name]
            if isinstance(factory, bytes):
                try:
                    factory = pickle.loads(factory)
                except Exception as exc:
                    raise ResourceError(
                        f"resource {name!r} of node {node!r}: its factory could not be"
                        f" unpickled in the worker ({type(exc).__name__}: {exc})"
                    ) from exc
                assert callable(factory)
                self._factories[name] = factory
            try:
                value = factory()
            except ActionTimeout:  # the action's own timeout, raised in the factory
                raise
            except Exception as exc:
                raise ResourceError(
                    f"resource {name!r} of node {node!r}: its factory raised"
                    f" {type(exc).__name__}: {exc}"
                ) from exc
            self._made[name] = value
            return value

    def close(self) -> None:
        """Close every resource made, the last made first (its ``close()``, else its
        ``__exit__(None, None, None)``); nothing is made afterwards. An error from a
        close is reported as a ``RuntimeWarning``, never raised: the others are
        closed all the same. Idempotent."""
        self._closed = True
        for lock in self._locks.values():
            with lock:  # a creation in progress ends first, and is closed below
                pass
        while self._made:
            name, value = self._made.popitem()  # the last made first
            try:
                close_resource(value)
            except Exception as exc:  # noqa: BLE001 - never break a worker's or runner's exit
                warnings.warn(
                    f"actionpool: closing resource {name!r} raised {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )


def close_resource(value: Any) -> None:
    """Close one resource: its ``close()`` when it has one, else its context manager's
    ``__exit__(None, None, None)``. A lock or semaphore (``acquire`` and ``release``)
    is left alone: its ``__exit__`` would release a lock nobody holds."""
    close = getattr(value, "close", None)
    if callable(close):
        close()
        return
    if hasattr(value, "acquire") and hasattr(value, "release"):
        return
    exit_ = getattr(type(value), "__exit__", None)
    if exit_ is not None:
        exit_(value, None, None, None)


def unknown(name: Any, node: str, names: tuple[str, ...]) -> str:
    """The message of the KeyError for an undeclared resource."""
    if not names:
        return (
            f"resource {name!r} of node {node!r}: no resources were declared"
            " (Runner(resources={name: factory}))"
        )
    known = ", ".join(map(repr, names))
    return f"resource {name!r} of node {node!r} was not declared; known resources: {known}"


class Resources(Mapping[str, Any]):
    """What ``ctx.resources`` is: the runner's resources, by name, read-only.

    ``ctx.resources["db"]`` makes the resource on its first use in this worker (cpu:
    this process; io: this runner) and returns the same instance afterwards. ``in``,
    ``len``, iterating and ``keys()`` list the declared names without making
    anything; ``values()`` and ``items()`` make every resource.

    Raises (from ``[name]``):
        KeyError: ``name`` was not declared; the message names the declared ones.
        ResourceError: the resource's factory raised (its exception is the
            ``__cause__``), or could not be unpickled in this worker.
    """

    __slots__ = ("_node", "_registry")

    def __init__(self, registry: ResourceRegistry | None, node: str) -> None:
        self._registry = registry
        self._node = node

    def __getitem__(self, name: str) -> Any:
        registry = self._registry
        if registry is None:
            raise KeyError(unknown(name, self._node, ()))
        return registry.get(name, self._node)

    def __contains__(self, name: object) -> bool:
        return self._registry is not None and name in self._registry.names

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names if self._registry is not None else ())

    def __len__(self) -> int:
        return len(self._registry.names) if self._registry is not None else 0

    def __repr__(self) -> str:
        return f"<Resources {list(self)!r} of node {self._node!r}>"


# ---- the registries of this process -------------------------------------------------

_REGISTRIES: dict[bytes, ResourceRegistry] = {}  # payload -> this process's registry
# Registries a forked child inherited from its parent, made by another process: never
# used here, and never dropped either, so that no finalizer of the parent's instances
# (a session's socket, a connection) runs in the child and disturbs the parent's.
_INHERITED: list[ResourceRegistry] = []
_LOCK = threading.Lock()


def register(payload: bytes, factories: Mapping[str, Factory]) -> ResourceRegistry:
    """The runner's own registry for ``payload`` in this process, where its io
    threads find it (:func:`registry_for`); the runner closes it (:func:`unregister`)."""
    registry = ResourceRegistry(payload, factories)
    with _LOCK:
        _REGISTRIES[payload] = registry
    return registry


def unregister(payload: bytes) -> ResourceRegistry | None:
    """Forget the runner's registry for ``payload`` (its caller closes it)."""
    with _LOCK:
        return _REGISTRIES.pop(payload, None)


def registry_for(payload: bytes) -> ResourceRegistry:
    """This process's registry for ``payload``, made on first use (a worker's first
    attempt that takes a Context)."""
    registry = _REGISTRIES.get(payload)
    if registry is not None and registry.pid == os.getpid():
        return registry
    with _LOCK:
        registry = _REGISTRIES.get(payload)
        if registry is None or registry.pid != os.getpid():
            if registry is not None:
                _INHERITED.append(registry)
            registry = _REGISTRIES[payload] = ResourceRegistry(payload)
        return registry


def view(payload: bytes | None, node: str) -> Resources:
    """``ctx.resources`` for an attempt of ``node`` whose task carries ``payload``."""
    return Resources(None if payload is None else registry_for(payload), node)


def close_process_registries() -> None:
    """Close every registry this process made (a cpu worker's end, at its pool's
    stop); those inherited from a parent are left alone."""
    with _LOCK:
        mine = [r for r in _REGISTRIES.values() if r.pid == os.getpid()]
        _INHERITED.extend(r for r in _REGISTRIES.values() if r.pid != os.getpid())
        _REGISTRIES.clear()
    for registry in mine:
        registry.close()
