"""Symbolic dims as exporters write them: names ("batch") and arithmetic over names ("s0 + s1",
"past_sequence_length + sequence_length", "max(a, b)")."""

from __future__ import annotations

import ast
import functools
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_FUNCS = {"max": max, "min": min}


@functools.cache
def _dim_expr(text: str) -> ast.expr | None:
    """The parsed expression, or None when `text` is an opaque name such as "a.b/c"."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    return tree if _is_arith(tree) else None


def _is_arith(node: ast.expr) -> bool:
    match node:
        case ast.Name() | ast.Constant(value=int()):
            return True
        case ast.BinOp(left=left, op=op, right=right):
            return type(op) in _OPS and _is_arith(left) and _is_arith(right)
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return _is_arith(operand)
        case ast.Call(func=ast.Name(id=func), args=args, keywords=[]):
            return func.lower() in _FUNCS and all(_is_arith(a) for a in args)
    return False


@functools.lru_cache(maxsize=4096)
def dim_symbols(text: str) -> tuple[str, ...]:
    """The free symbols a dim depends on: itself when it is a name, else the names in it."""
    tree = _dim_expr(text)
    if tree is None:
        return (text,)
    functions = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return tuple(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in functions)


def eval_dim(text: str, values: dict[str, int]) -> int:
    if text in values:
        return values[text]
    tree = _dim_expr(text)
    assert tree is not None, "opaque dims are symbols and always have a value"
    return _eval(tree, values)


def _eval(node: ast.expr, values: dict[str, int]) -> int:
    match node:
        case ast.Name(id=name):
            return values[name]
        case ast.Constant(value=value):
            return value
        case ast.BinOp(left=left, op=op, right=right):
            return _OPS[type(op)](_eval(left, values), _eval(right, values))
        case ast.UnaryOp(operand=operand):
            return -_eval(operand, values)
        case ast.Call(func=ast.Name(id=func), args=args):
            return _FUNCS[func.lower()](*(_eval(a, values) for a in args))
    raise AssertionError(f"unsupported dim expression node {ast.dump(node)}")
