"""The stage graph: order, cycles and unknown needs named with the fix, --from/--only."""
from __future__ import annotations

import pytest

from torchcapsule.config import parse_project
from torchcapsule.errors import ConfigError, PipelineError
from torchcapsule.pipeline import dag

from ..conftest import EXAMPLE

MAIN = {"test": (), "train": ("test",), "evaluate": ("train",), "register": ("evaluate",),
        "serve": ("register",)}


def test_order_follows_needs_and_declaration_order_for_ties():
    g = {"report": ("a", "b"), "b": ("prep",), "a": ("prep",), "prep": ()}
    assert dag.order(g) == ["prep", "b", "a", "report"]
    assert dag.order(MAIN) == ["test", "train", "evaluate", "register", "serve"]


def test_order_of_the_example_project():
    from torchcapsule.config import load_project

    p = load_project(EXAMPLE / "capsule.yaml")
    assert dag.order(dag.graph_of(p)) == ["test", "train", "evaluate", "register", "serve"]


@pytest.mark.parametrize("graph, cycle, fix", [
    ({"a": ("b",), "b": ("a",)}, "a -> b -> a", "remove 'b' from stages.a.needs"),
    ({"a": ("c",), "b": ("a",), "c": ("b",), "d": ()}, "a -> b -> c -> a", "remove 'c' from stages.a.needs"),
])
def test_cycle_is_named_in_run_order_with_the_fix(graph, cycle, fix):
    with pytest.raises(PipelineError) as e:
        dag.order(graph)
    msg = str(e.value)
    assert cycle in msg and fix in msg and "\n" not in msg


def test_self_need_and_unknown_need():
    with pytest.raises(PipelineError, match=r"stages.a.needs: 'a' needs itself; remove 'a'"):
        dag.check({"a": ("a",)})
    with pytest.raises(PipelineError, match=r"stages.train.needs: unknown stage 'tset' \(did you mean 'test'\?\)"):
        dag.check({"test": (), "train": ("tset",)})


def test_capsule_yaml_with_a_cycle_fails_at_load_with_its_line():
    text = "name: x\nstages:\n  a:\n    run: 'true'\n    needs: [b]\n  b:\n    run: 'true'\n    needs: [a]\n"
    with pytest.raises(ConfigError) as e:
        parse_project(text, "capsule.yaml")
    msg = str(e.value)
    assert msg.startswith("capsule.yaml:") and "cycle" in msg and "remove '" in msg, msg


def test_from_selects_the_stage_and_everything_downstream():
    assert dag.select(MAIN, from_stage="evaluate") == ["evaluate", "register", "serve"]
    g = {"prep": (), "a": ("prep",), "b": ("prep",), "report": ("a",)}
    assert dag.select(g, from_stage="a") == ["a", "report"]


def test_only_selects_exactly_those_in_run_order():
    assert dag.select(MAIN, only=["serve", "test"]) == ["test", "serve"]
    assert dag.select(MAIN) == dag.order(MAIN)


def test_from_and_only_together_and_bad_names():
    assert dag.select(MAIN, from_stage="train", only=["test", "evaluate"]) == ["evaluate"]
    with pytest.raises(PipelineError, match="no stage is in both"):
        dag.select(MAIN, from_stage="train", only=["test"])
    with pytest.raises(PipelineError, match=r"--from: unknown stage 'evalute' \(did you mean 'evaluate'\?\)"):
        dag.select(MAIN, from_stage="evalute")
    with pytest.raises(PipelineError, match=r"--only: unknown stage 'x'"):
        dag.select(MAIN, only=["x"])


def test_upstream_and_downstream():
    assert dag.upstream(MAIN, "evaluate") == {"test", "train"}
    assert dag.downstream(MAIN, "register") == {"register", "serve"}
