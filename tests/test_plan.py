"""Tests for plan.py: building plans, edges, graph checks, resolve(), and PlanError at run."""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path

import pytest

import actionpool as ap
from actionpool.plan import Graph, Node, find_nodes, resolve
from tests.helpers import square as h_square


def f(*args, **kwargs):
    return args, kwargs


def g(*args, **kwargs):
    return None


def write_file(path: str, text: str = "ran") -> str:
    Path(path).write_text(text)
    return path


Pair = namedtuple("Pair", "left right")


# ---- add and names --------------------------------------------------------------------


def test_add_returns_node_with_its_call():
    plan = ap.Plan()
    node = plan.add(f, 1, 2, k=3)
    assert isinstance(node, Node)
    assert isinstance(node, ap.Node)
    assert node.index == 0
    assert node.name == "f"
    assert node.args == (1, 2)
    assert node.kwargs == {"k": 3}
    assert node.deps == ()
    assert isinstance(node.action, ap.ActionSpec) and node.action.fn is f
    assert plan.nodes == (node,)
    assert len(plan) == 1
    assert plan["f"] is node
    assert node in plan and "f" in plan
    assert list(plan) == [node]


def test_add_keeps_declared_action_options():
    spec = ap.action(f, kind="io", timeout=3)
    node = ap.Plan().add(spec)
    assert node.action is spec


def test_auto_names_number_repeats():
    plan = ap.Plan()
    names = [plan.add(f).name for _ in range(4)]
    assert names == ["f", "f#1", "f#2", "f#3"]
    assert plan.add(g).name == "g"
    assert [n.index for n in plan.nodes] == [0, 1, 2, 3, 4]


def test_auto_names_skip_names_taken_explicitly():
    plan = ap.Plan()
    plan.add(g, name="f")
    plan.add(g, name="f#1")
    assert plan.add(f).name == "f#2"
    assert plan.add(f).name == "f#3"


def test_auto_name_uses_declared_action_name():
    plan = ap.Plan()
    spec = ap.action(f, name="fetch")
    assert [plan.add(spec).name for _ in range(2)] == ["fetch", "fetch#1"]


def test_explicit_duplicate_name_raises_naming_it():
    plan = ap.Plan()
    plan.add(f, name="load")
    with pytest.raises(ap.PlanError, match="'load'"):
        plan.add(g, name="load")
    assert len(plan) == 1  # the failed add left nothing behind


def test_explicit_name_equal_to_an_auto_name_raises():
    plan = ap.Plan()
    plan.add(f)
    with pytest.raises(ap.PlanError, match="'f'"):
        plan.add(g, name="f")


@pytest.mark.parametrize("bad", ["", 3, ("a",)])
def test_bad_name_type_raises(bad):
    with pytest.raises(ap.PlanError):
        ap.Plan().add(f, name=bad)


def test_plan_error_is_an_actionpool_error_and_value_error():
    assert issubclass(ap.PlanError, ap.ActionpoolError)
    assert issubclass(ap.PlanError, ValueError)


def test_unknown_name_lookup_is_key_error():
    with pytest.raises(KeyError):
        ap.Plan()["nope"]


# ---- edges ----------------------------------------------------------------------------


def test_nodes_in_arguments_become_deps():
    plan = ap.Plan()
    a, b, c, d, e = (plan.add(f, name=n) for n in "abcde")
    x = plan.add(f, a, [b, (c, 1)], {"k": {"deep": [d]}}, key=e)
    assert x.deps == (a, b, c, d, e)


def test_nodes_in_kwargs_lists_tuples_dicts_and_dict_keys_become_deps():
    plan = ap.Plan()
    a, b, c = (plan.add(f, name=n) for n in "abc")
    x = plan.add(f, opts={a: "as key"}, many=(b, [c]))
    assert set(x.deps) == {a, b, c}


def test_repeated_dep_is_listed_once_in_first_seen_order():
    plan = ap.Plan()
    a, b = plan.add(f, name="a"), plan.add(f, name="b")
    x = plan.add(f, b, a, [b, a], k=b)
    assert x.deps == (b, a)


def test_nodes_inside_other_objects_are_not_deps():
    # Only lists, tuples and dicts are searched; a set or custom object is a plain value.
    plan = ap.Plan()
    a = plan.add(f, name="a")
    x = plan.add(f, {a})
    assert x.deps == ()


def test_find_nodes_walks_nested_containers():
    plan = ap.Plan()
    a, b = plan.add(f), plan.add(f)
    found: list = []
    find_nodes({"x": [(a,)], b: 1, "y": "no"}, found)
    assert found == [a, b]


def test_after_with_nodes_and_names():
    plan = ap.Plan()
    a = plan.add(f, name="a")
    b = plan.add(f, name="b")
    c = plan.add(f, name="c", after=[a, "b"])
    d = plan.add(f, name="d", after=a)
    e = plan.add(f, name="e", after="c")
    graph = plan.graph()
    assert c.deps == ()  # after= is ordering, not data
    assert graph.deps[c.index] == (a.index, b.index)
    assert graph.deps[d.index] == (a.index,)
    assert graph.deps[e.index] == (c.index,)
    assert graph.dependents[a.index] == (c.index, d.index)


def test_after_a_name_added_later():
    plan = ap.Plan()
    report = plan.add(f, name="report", after=["train"])
    train = plan.add(f, name="train")
    graph = plan.graph()
    assert graph.deps[report.index] == (train.index,)
    assert graph.order == (train.index, report.index)


def test_after_and_argument_edges_merge():
    plan = ap.Plan()
    a = plan.add(f, name="a")
    b = plan.add(f, a, name="b", after=["a"])
    assert plan.graph().deps[b.index] == (a.index,)


def test_unknown_after_name_raises_at_graph_naming_node_name_and_suggestion():
    plan = ap.Plan()
    plan.add(f, name="simulate")
    plan.add(f, name="report", after=["simulat"])  # fine at add: it may come later
    with pytest.raises(ap.PlanError) as info:
        plan.graph()
    msg = str(info.value)
    assert "'report'" in msg
    assert "'simulat'" in msg
    assert "did you mean 'simulate'" in msg


def test_unknown_after_name_without_close_match_has_no_suggestion():
    plan = ap.Plan()
    plan.add(f, name="simulate")
    plan.add(f, name="report", after="zzzz")
    with pytest.raises(ap.PlanError, match=r"'report'.*'zzzz'") as info:
        plan.graph()
    assert "did you mean" not in str(info.value)


def _cycle_in(message: str) -> list[str]:
    """The node names of ``cycle: a -> b -> a`` in a PlanError message."""
    m = re.search(r"cycle: (.*)$", message)
    assert m, message
    return [part.strip().strip("'\"") for part in m.group(1).split("->")]


def test_two_node_cycle_names_both_in_order():
    plan = ap.Plan()
    plan.add(f, name="alpha", after="beta")
    plan.add(f, name="beta", after="alpha")
    with pytest.raises(ap.PlanError, match="cycle") as info:
        plan.graph()
    names = _cycle_in(str(info.value))
    assert names[0] == names[-1]
    assert sorted(names[:-1]) == ["alpha", "beta"]


def test_cycle_names_exactly_its_nodes_in_run_order():
    # load -> train -> score -> load, plus "report" which waits on the cycle but is
    # not on it, and "setup" which is upstream of it.
    plan = ap.Plan()
    plan.add(f, name="report", after="load")
    plan.add(f, name="setup")
    plan.add(f, name="load", after=["score", "setup"])
    plan.add(f, name="train", after="load")
    plan.add(f, name="score", after="train")
    with pytest.raises(ap.PlanError, match="cycle") as info:
        plan.graph()
    names = _cycle_in(str(info.value))
    assert names[0] == names[-1], names
    on_cycle = names[:-1]
    assert sorted(on_cycle) == ["load", "score", "train"]
    # "x -> y" means y runs after x: every step printed is a real edge, in that direction
    runs_after = {"load": {"score", "setup"}, "train": {"load"}, "score": {"train"}}
    for x, y in itertools.pairwise(names):
        assert x in runs_after[y], (x, y, names)


def test_self_dependency_is_a_cycle():
    plan = ap.Plan()
    plan.add(f, name="ouroboros", after=["ouroboros"])
    with pytest.raises(ap.PlanError, match=r"cycle.*'ouroboros'"):
        plan.graph()


def test_node_of_another_plan_as_argument_raises():
    other = ap.Plan()
    foreign = other.add(f, name="foreign")
    plan = ap.Plan()
    with pytest.raises(ap.PlanError, match=r"'mine'.*another plan"):
        plan.add(f, [foreign], name="mine")
    with pytest.raises(ap.PlanError, match="another plan"):
        plan.add(f, k={"x": foreign})
    assert len(plan) == 0


def test_node_of_another_plan_in_after_raises():
    other = ap.Plan()
    foreign = other.add(f, name="foreign")
    plan = ap.Plan()
    with pytest.raises(ap.PlanError, match=r"'mine'.*another plan"):
        plan.add(f, name="mine", after=[foreign])
    with pytest.raises(ap.PlanError, match="another plan"):
        plan.add(f, after=foreign)
    assert len(plan) == 0


def test_foreign_node_is_not_in_plan():
    other = ap.Plan()
    foreign = other.add(f, name="f")
    plan = ap.Plan()
    plan.add(f, name="f")
    assert foreign not in plan


@pytest.mark.parametrize("bad", [42, None, "not callable"])
def test_non_callable_fn_raises_plan_error(bad):
    with pytest.raises(ap.PlanError, match="callable"):
        ap.Plan().add(bad)


def test_non_callable_fn_message_names_the_node():
    with pytest.raises(ap.PlanError, match=r"'n1'.*callable"):
        ap.Plan().add(42, name="n1")


@pytest.mark.parametrize("bad", [[3], [1.5], ["a", 2], [None]])
def test_after_with_bad_entry_raises_plan_error(bad):
    with pytest.raises(ap.PlanError, match="after="):
        ap.Plan().add(f, name="n", after=bad)


@pytest.mark.parametrize("bad", [5, 2.5])
def test_after_a_bare_non_iterable_raises_plan_error(bad):
    with pytest.raises(ap.PlanError, match="after="):
        ap.Plan().add(f, name="n", after=bad)


# ---- Graph ----------------------------------------------------------------------------


def test_graph_order_is_plan_order_when_edges_allow():
    plan = ap.Plan()
    a = plan.add(f, name="a")
    b = plan.add(f, a, name="b")
    plan.add(f, name="c")
    plan.add(f, b, name="d")
    graph = plan.graph()
    assert isinstance(graph, Graph)
    assert graph.order == (0, 1, 2, 3)
    assert graph.nodes == plan.nodes


def test_graph_order_is_topological_with_forward_names():
    plan = ap.Plan()
    plan.add(f, name="first", after="late")  # 0 waits for 3
    plan.add(f, name="free")  # 1
    plan.add(f, name="mid", after="first")  # 2 waits for 0
    plan.add(f, name="late")  # 3
    graph = plan.graph()
    # among ready nodes, plan order wins: 1 and 3 are ready at once, 1 comes first
    assert graph.order == (1, 3, 0, 2)
    pos = {i: k for k, i in enumerate(graph.order)}
    for i, deps in enumerate(graph.deps):
        for d in deps:
            assert pos[d] < pos[i]


def test_graph_of_a_wide_fan_in_is_topological():
    plan = ap.Plan()
    parts = [plan.add(f, i, name=f"p{i}") for i in range(20)]
    total = plan.add(f, parts, name="total")
    graph = plan.graph()
    assert graph.deps[total.index] == tuple(range(20))
    assert graph.order[-1] == total.index


def test_ancestors_bitsets():
    plan = ap.Plan()
    a = plan.add(f, name="a")  # 0
    b = plan.add(f, a, name="b")  # 1: a
    c = plan.add(f, name="c")  # 2
    d = plan.add(f, b, c, name="d")  # 3: b, c, a
    e = plan.add(f, name="e", after="d")  # 4: everything
    anc = plan.graph().ancestors()
    assert anc[a.index] == 0
    assert anc[b.index] == 0b1
    assert anc[c.index] == 0
    assert anc[d.index] == 0b111
    assert anc[e.index] == 0b1111


def test_ancestors_with_forward_after_name():
    plan = ap.Plan()
    first = plan.add(f, name="first", after="second")
    second = plan.add(f, name="second")
    anc = plan.graph().ancestors()
    assert anc[first.index] == 1 << second.index
    assert anc[second.index] == 0


def test_graph_of_an_empty_plan():
    graph = ap.Plan().graph()
    assert graph.nodes == () and graph.order == () and graph.ancestors() == []


def test_a_plan_can_be_checked_twice():
    plan = ap.Plan()
    plan.add(f, name="x", after="y")
    plan.add(f, name="y")
    assert plan.graph() == plan.graph()


# ---- resolve --------------------------------------------------------------------------


def test_resolve_replaces_nodes_in_nested_containers():
    plan = ap.Plan()
    a, b, c = (plan.add(f, name=n) for n in "abc")
    values = {a: 1, b: 2, c: 3}
    obj = (a, [b, {"k": (c, "x")}], {"deep": [[a]]}, "plain", 7)
    expected = (1, [2, {"k": (3, "x")}], {"deep": [[1]]}, "plain", 7)
    assert resolve(obj, values.__getitem__) == expected


def test_resolve_namedtuple_keeps_its_type():
    plan = ap.Plan()
    a, b = plan.add(f), plan.add(f)
    out = resolve(Pair(a, [b]), {a: "L", b: "R"}.__getitem__)
    assert type(out) is Pair
    assert out == Pair("L", ["R"])
    assert out.left == "L"


def test_resolve_dict_keys_and_dict_subclass():
    plan = ap.Plan()
    a, b = plan.add(f), plan.add(f)
    out = resolve({a: b, "x": a}, {a: "ka", b: "vb"}.__getitem__)
    assert out == {"ka": "vb", "x": "ka"}
    od = resolve(OrderedDict([("z", a), ("y", 1)]), {a: 0}.__getitem__)
    assert type(od) is OrderedDict and list(od.items()) == [("z", 0), ("y", 1)]


def test_resolve_defaultdict_keeps_its_type_and_factory():
    plan = ap.Plan()
    a = plan.add(f)
    out = resolve(defaultdict(list, {"k": a}), lambda n: 1)
    assert type(out) is defaultdict
    assert out == {"k": 1}
    assert out.default_factory is list


def test_resolve_bare_node():
    plan = ap.Plan()
    a = plan.add(f)
    assert resolve(a, lambda n: n.name) == "f"


def test_resolve_does_not_mutate_its_input():
    plan = ap.Plan()
    a = plan.add(f)
    inner = [a]
    obj = {"k": inner}
    out = resolve(obj, lambda n: 5)
    assert out == {"k": [5]}
    assert obj == {"k": [a]} and inner == [a] and obj["k"] is inner


def test_resolve_leaves_non_container_values_as_they_are():
    marker = object()
    s = {1, 2}
    assert resolve(marker, lambda n: 0) is marker
    assert resolve(s, lambda n: 0) is s
    assert resolve("text", lambda n: 0) == "text"


def test_resolve_values_of_containers_without_nodes_are_equal():
    obj = ([1, 2], (3, {"a": [4]}), Pair(1, 2))
    assert resolve(obj, lambda n: 0) == obj


def test_resolve_returns_containers_without_nodes_unchanged():
    big = list(range(1000))
    nested = {"a": [1, (2, 3)], "b": big}
    plan = ap.Plan()
    a = plan.add(f)
    out = resolve([a, nested], lambda n: 0)
    assert out[1] is nested
    assert resolve(big, lambda n: 0) is big
    for obj in [(1, [2]), Pair(1, 2), {"k": (1,)}, OrderedDict(a=1), []]:
        assert resolve(obj, lambda n: 0) is obj
    # a container with a node is a new object; its node-free parts are shared
    tup = ((1, 2), a)
    out = resolve(tup, lambda n: 0)
    assert out == ((1, 2), 0) and out is not tup and out[0] is tup[0]


# ---- end to end: PlanError before anything runs --------------------------------------


def _plan_that_writes(path: Path) -> ap.Plan:
    plan = ap.Plan()
    plan.add(write_file, str(path), name="writer")
    return plan


@pytest.mark.parametrize("problem", ["unknown_after", "cycle", "self"])
def test_runner_run_raises_plan_error_before_anything_runs(runner, tmp_path, problem):
    canary = tmp_path / "must-not-exist.txt"
    plan = _plan_that_writes(canary)
    if problem == "unknown_after":
        plan.add(f, name="report", after=["writre"])
        expected = r"'report'.*'writre'.*did you mean 'writer'"
    elif problem == "cycle":
        plan.add(f, name="x", after="y")
        plan.add(f, name="y", after="x")
        expected = r"cycle: '?([xy])'? -> '?[xy]'? -> '?\1'?"
    else:
        plan.add(f, name="me", after="me")
        expected = r"cycle.*'me'"
    with pytest.raises(ap.PlanError, match=expected):
        runner.run(plan)

    # The runner is still usable, and the same writer really writes when a plan is valid:
    # so the canary's absence below means something.
    proof = tmp_path / "written.txt"
    report = runner.run(_plan_that_writes(proof))
    assert report.status is ap.RunStatus.SUCCEEDED
    assert proof.read_text() == "ran"

    # Closing waits for every run and every worker: had the bad plan started, the
    # writer would have finished by now.
    runner.close()
    assert not canary.exists()


def test_runner_run_rejects_a_non_plan(runner):
    with pytest.raises(ap.PlanError, match="Plan"):
        runner.run([write_file])


def test_a_plan_runs_with_forward_after_names_and_resolved_arguments(runner):
    plan = ap.Plan()
    out = plan.add(f, name="out", after="late")
    late = plan.add(f, 1, name="late")
    total = plan.add(f, [late, {"o": out}], Pair(late, 2), name="total")
    report = runner.run(plan)
    assert report.status is ap.RunStatus.SUCCEEDED
    late_value = ((1,), {})
    out_value = ((), {})
    args, kwargs = report[total]
    assert args == ([late_value, {"o": out_value}], Pair(late_value, 2))
    assert type(args[1]) is Pair
    assert kwargs == {}
    o_out, o_late = report.outcome(out), report.outcome(late)
    assert o_late.finished_at <= o_out.started_at


def test_a_defaultdict_argument_with_a_node_runs_end_to_end(runner: ap.Runner) -> None:
    from collections import defaultdict

    def total(d: dict[str, int]) -> int:
        return sum(d.values()) + d["missing"]  # the factory survived the trip

    plan = ap.Plan()
    a = plan.add(h_square, 3)
    arg: defaultdict[str, object] = defaultdict(int, {"a": a})
    t = plan.add(total, arg)
    assert runner.run(plan)[t] == 9


def test_an_argument_that_cannot_be_resolved_fails_the_node_not_the_run(
    runner: ap.Runner,
) -> None:
    class Strict(dict):  # type: ignore[type-arg]
        def update(self, *a: object, **k: object) -> None:
            raise RuntimeError("refuses updates")

    plan = ap.Plan()
    a = plan.add(h_square, 3)
    bad = plan.add(len, Strict(x=a))
    ok = plan.add(h_square, 2)
    report = runner.run(plan)
    assert report.outcome(bad).status is ap.Status.FAILED
    assert "refuses updates" in str(report.outcome(bad).error)
    assert report[ok] == 4
