"""The promotion rule: parsed with an AST whitelist, evaluated without eval()."""
from __future__ import annotations

import pytest

from torchcapsule.errors import ConfigError
from torchcapsule.registry.rules import decide, evaluate, parse_rule

RULE = "accuracy >= 0.95 and accuracy >= champion.accuracy"


def test_parse_names_metrics_and_aliases():
    r = parse_rule(RULE)
    assert r.metrics == {"accuracy"} and r.aliases == {"champion"}


@pytest.mark.parametrize("metrics, champion, expected", [
    ({"accuracy": 0.97}, None, True),                     # no champion yet: that clause is skipped
    ({"accuracy": 0.97}, {"accuracy": 0.96}, True),
    ({"accuracy": 0.97}, {"accuracy": 0.97}, True),       # ties keep the >= meaning
    ({"accuracy": 0.96}, {"accuracy": 0.98}, False),      # worse than the champion
    ({"accuracy": 0.90}, None, False),                    # below the floor
    ({"loss": 0.1}, None, False),                         # the candidate lacks the metric
    ({"accuracy": 0.97}, {"loss": 0.2}, True),            # the champion lacks it: skipped
])
def test_evaluate(metrics, champion, expected):
    ok, why = evaluate(parse_rule(RULE), metrics, {"champion": champion})
    assert ok is expected, why


def test_reason_names_the_failing_clause_and_values():
    ok, why = evaluate(parse_rule(RULE), {"accuracy": 0.96}, {"champion": {"accuracy": 0.98}})
    assert not ok
    assert "accuracy >= champion.accuracy: fails (0.96 >= 0.98 is false)" in why
    assert "accuracy >= 0.95: holds" in why
    _, why = evaluate(parse_rule(RULE), {"accuracy": 0.97}, {"champion": None})
    assert "no champion yet" in why


def test_arithmetic_or_not_and_chains():
    r = parse_rule("not (loss > 0.5) and (accuracy - champion.accuracy >= -0.01 or 0.99 <= accuracy <= 1)")
    assert evaluate(r, {"loss": 0.1, "accuracy": 0.995}, {"champion": {"accuracy": 0.2}})[0]
    assert evaluate(r, {"loss": 0.1, "accuracy": 0.95}, {"champion": {"accuracy": 0.955}})[0]
    assert not evaluate(r, {"loss": 0.1, "accuracy": 0.90}, {"champion": {"accuracy": 0.95}})[0]
    assert not evaluate(r, {"loss": 0.9, "accuracy": 0.995}, {"champion": None})[0]
    # division by zero is a failed clause, not a crash
    assert not evaluate(parse_rule("accuracy / loss > 1"), {"accuracy": 1.0, "loss": 0.0}, {})[0]


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/pwned')",
    "open('/etc/passwd')",
    "accuracy[0] > 1",
    "(lambda: 1)() > 0",
    "champion.__class__ > 0",
    "a.b.c > 1",
    "'x' > 1",
    "True",
    "accuracy if loss else 1",
    "[1][0] > 0",
    "accuracy >=",
    "x := 1",
])
def test_everything_outside_the_whitelist_is_a_config_error(text):
    with pytest.raises(ConfigError) as e:
        parse_rule(text)
    assert str(e.value).startswith("registry.promote.rule: ")
    assert "\n" not in str(e.value)


def test_no_rule_promotes_and_says_so():
    ok, why = decide(None, {"accuracy": 0.1}, {})
    assert ok and "no rule" in why


def test_capsule_yaml_rule_is_checked_at_load_with_its_line():
    from torchcapsule.config import parse_project

    text = "name: x\nregistry:\n  promote:\n    rule: \"__import__('os').system('x')\"\n"
    with pytest.raises(ConfigError) as e:
        parse_project(text, "capsule.yaml")
    assert str(e.value).startswith("capsule.yaml:4: registry.promote.rule: ")
    ok = parse_project("name: x\nregistry: {promote: {rule: 'accuracy >= 0.9'}}\n", "capsule.yaml")
    assert ok.registry.promote.rule == "accuracy >= 0.9"
