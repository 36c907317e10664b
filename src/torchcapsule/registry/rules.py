"""The promotion rule of capsule.yaml (registry.promote.rule), parsed and evaluated safely.

    accuracy >= 0.95 and accuracy >= champion.accuracy

A rule is a Python-like boolean expression over the candidate's metrics (bare names) and the
metrics of the versions that other aliases point at (`ALIAS.metric`). It is parsed with `ast`
and checked against a whitelist of node types (and/or/not, comparisons, + - * /, numbers,
names, ALIAS.metric); it is never passed to eval(). Pure: no registry access.

Missing values: a comparison against an alias that points nowhere yet (the first version has
no champion) or whose version lacks the metric counts as satisfied, and the reason says so; a
metric the candidate lacks makes its comparison fail.
"""
from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError

_CMP = {ast.Gt: (operator.gt, ">"), ast.GtE: (operator.ge, ">="), ast.Lt: (operator.lt, "<"),
        ast.LtE: (operator.le, "<="), ast.Eq: (operator.eq, "=="), ast.NotEq: (operator.ne, "!=")}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
            ast.Compare, ast.BinOp, ast.Constant, ast.Name, ast.Attribute, ast.Load,
            *_CMP, *_ARITH)
WHERE = "registry.promote.rule"
# Rules are a line or two; a longer one (3,000 `+` terms, 50k `not`) only exhausts the parser's
# stack or memory, so it is refused before parsing.
MAX_RULE_CHARS = 1000
MAX_RULE_DEPTH = 64


@dataclass(frozen=True)
class Rule:
    text: str
    tree: ast.Expression
    metrics: frozenset[str]  # candidate metrics used
    aliases: frozenset[str]  # aliases referenced as ALIAS.metric


@dataclass(frozen=True)
class _Missing:
    """A value that could not be looked up; `ref` tells whether it belongs to another version."""

    what: str
    ref: bool


def parse_rule(text: str, where: str = WHERE) -> Rule:
    if len(text) > MAX_RULE_CHARS:
        raise ConfigError.at(where, f"the rule is {len(text)} characters, over the limit of {MAX_RULE_CHARS}; "
                          "write a shorter rule (a few comparisons joined by and/or)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError.at(where, f"'{text}' is not a valid rule ({e.msg}); "
                          "write e.g. 'accuracy >= 0.95 and accuracy >= champion.accuracy'") from None
    except (RecursionError, MemoryError):  # nesting too deep for the parser, within the length cap
        raise ConfigError.at(where, "the rule is nested too deeply to parse; write a flatter rule") from None
    depth, stack = 0, [(tree, 1)]
    while stack:  # evaluate() and the reasons recurse per level: bound it here, once
        node, d = stack.pop()
        depth = max(depth, d)
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    if depth > MAX_RULE_DEPTH:
        raise ConfigError.at(where, f"the rule nests {depth} levels deep, over the limit of {MAX_RULE_DEPTH}; "
                          "write a flatter rule (a few comparisons joined by and/or)")
    metrics, aliases = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ConfigError.at(
                where, f"'{ast.unparse(node) if isinstance(node, ast.expr) else text}' is not allowed "
                f"({type(node).__name__}); use metric names, ALIAS.metric, numbers, comparisons, "
                "+ - * /, and, or, not"
            )
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or
                                               not isinstance(node.value, (int, float))):
            raise ConfigError.at(where, f"{node.value!r} is not a number; a rule compares numbers only")
        if isinstance(node, ast.Attribute):
            if not isinstance(node.value, ast.Name):
                raise ConfigError.at(where, f"'{ast.unparse(node)}' is not ALIAS.metric (one dot only)")
            if node.attr.startswith("_"):
                raise ConfigError.at(where, f"'{ast.unparse(node)}': metric names cannot start with '_'")
            aliases.add(node.value.id)
        elif isinstance(node, ast.Name) and not _is_alias_base(tree, node):
            metrics.add(node.id)
    return Rule(text.strip(), tree, frozenset(metrics), frozenset(aliases))


def _is_alias_base(tree: ast.AST, name: ast.Name) -> bool:
    return any(isinstance(n, ast.Attribute) and n.value is name for n in ast.walk(tree))


def evaluate(rule: Rule, metrics: Mapping[str, float],
             refs: Mapping[str, Mapping[str, float] | None]) -> tuple[bool, str]:
    """(holds, why): `refs` maps each alias to its version's metrics, or None when unset."""
    notes: list[str] = []
    ok = bool(_eval(rule.tree.body, metrics, refs, notes))
    return ok, "; ".join(dict.fromkeys(notes))  # unique, in order


def _fmt(v: object) -> str:
    if isinstance(v, _Missing):
        return v.what
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _eval(node: ast.AST, m: Mapping[str, float], refs: Mapping[str, Mapping[str, float] | None],
          notes: list[str]):
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            results = [_eval(v, m, refs, notes) for v in node.values]  # all: the reason names every failure
            return all(results)
        return any([_eval(v, m, refs, notes) for v in node.values])
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, m, refs, notes)
        if isinstance(node.op, ast.Not):
            return not v
        if isinstance(v, _Missing):
            return v
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in m:
            return float(m[node.id])
        return _Missing(f"{node.id} (not logged by this version)", ref=False)
    if isinstance(node, ast.Attribute):
        alias = node.value.id  # type: ignore[attr-defined]
        other = refs.get(alias)
        if other is None:
            return _Missing(f"{alias}.{node.attr} (no {alias} yet)", ref=True)
        if node.attr not in other:
            return _Missing(f"{alias}.{node.attr} (the {alias} has no {node.attr})", ref=True)
        return float(other[node.attr])
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, m, refs, notes), _eval(node.right, m, refs, notes)
        for v in (a, b):
            if isinstance(v, _Missing):
                return v
        try:
            return _ARITH[type(node.op)](a, b)
        except ZeroDivisionError:
            return _Missing(f"{ast.unparse(node)} (division by zero)", ref=False)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, m, refs, notes)
        ok = True
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, m, refs, notes)
            fn, sym = _CMP[type(op)]
            text = f"{ast.unparse(node)}"
            missing = [v for v in (left, right) if isinstance(v, _Missing)]
            if any(not v.ref for v in missing):
                notes.append(f"{text}: fails, {missing[0].what}")
                ok = False
            elif missing:
                notes.append(f"{text}: skipped, {missing[0].what}")
            elif fn(left, right):
                notes.append(f"{text}: holds ({_fmt(left)} {sym} {_fmt(right)})")
            else:
                notes.append(f"{text}: fails ({_fmt(left)} {sym} {_fmt(right)} is false)")
                ok = False
            left = right
        return ok
    raise ConfigError.at(WHERE, f"unsupported expression '{ast.unparse(node)}'")  # parse_rule forbids it


def decide(rule_text: str | None, metrics: Mapping[str, float],
           refs: Mapping[str, Mapping[str, float] | None]) -> tuple[bool, str]:
    """No rule: promote (say so). A rule: evaluate it."""
    if not rule_text:
        return True, f"no rule in {WHERE}: every registered version is promoted"
    return evaluate(parse_rule(rule_text), metrics, refs)
