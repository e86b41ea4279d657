"""`--where` filters: a small, safe expression language compiled to pyarrow compute expressions.

Nothing is `eval`ed: the text is parsed with `ast` and only comparisons, `and`/`or`/`not`, `in`, `is None`,
column names and constant arithmetic are accepted, e.g.

    attention == 'prefix' and lr < 1e-4
    outcome in ['ok', 'diverged'] and not (grad_accum >= 8)
    peak_memory_bytes / 2**30 > 6 or error is not None
"""
from __future__ import annotations

import ast
import math
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc


class QueryError(ValueError):
    """A query that cannot run; the message names the flag at fault."""


_CMP = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}
_ARITH = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply, ast.Div: pc.divide, ast.Pow: pc.power}


def _const(node: ast.AST, flag: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _const(node.operand, flag)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_const(e, flag) for e in node.elts]
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        a, b = _const(node.left, flag), _const(node.right, flag)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            return _fold(type(node.op), a, b, ast.unparse(node), flag)
    raise _NotConst


def _fold(op: type, a: float, b: float, text: str, flag: str) -> float:
    """Constant arithmetic that always ends quickly: an integer power beyond 64 bits is taken in floats
    (never an unbounded integer), and every result is a finite number Arrow can compare with (or a
    QueryError naming the constant)."""
    small_int_power = (op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b >= 0
                       and (abs(a) <= 1 or b * math.log2(abs(a)) < 63))
    if small_int_power:  # stays an int, so integer columns divide by it exactly
        return a ** b
    try:
        result = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                  ast.Div: lambda: a / b, ast.Pow: lambda: float(a) ** float(b)}[op]()
    except ZeroDivisionError:
        raise QueryError(f"{flag}: {text}: division by zero") from None
    except OverflowError:
        raise QueryError(f"{flag}: {text}: too large a number") from None
    if isinstance(result, complex) or not math.isfinite(result) or abs(result) > 1.7e308:
        raise QueryError(f"{flag}: {text}: not a finite real number")
    return float(result) if isinstance(result, int) and abs(result) >= 2 ** 63 else result


class _NotConst(Exception):
    pass


def compile_where(text: str, columns: Iterable[str], flag: str = "--where") -> pc.Expression:
    """Compile a filter expression to a pyarrow Expression; raises QueryError."""
    columns = list(columns)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise QueryError(f"{flag}: cannot parse {text!r}: {e.msg}") from None

    def value(node: ast.AST) -> Any:
        try:
            return _const(node, flag)
        except _NotConst:
            pass
        if isinstance(node, ast.Name):
            if node.id in ("true", "false", "none", "null"):
                return {"true": True, "false": False}.get(node.id)
            if node.id not in columns:
                raise QueryError(f"{flag}: unknown column {node.id!r}; columns: {', '.join(columns)}")
            return pc.field(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            operands = [value(node.left), value(node.right)]
            if any(not isinstance(v, (pc.Expression, int, float)) or isinstance(v, bool) for v in operands):
                raise QueryError(f"{flag}: {ast.unparse(node)!r}: arithmetic needs numbers or numeric columns")
            return _ARITH[type(node.op)](*operands)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return pc.negate(value(node.operand))
        return boolean(node)

    def compare(op: ast.cmpop, left: Any, right_node: ast.AST) -> pc.Expression:
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                raise QueryError(f"{flag}: 'is' only compares with None")
            e = left.is_null() if isinstance(left, pc.Expression) else pc.scalar(left is None)
            return e if isinstance(op, ast.Is) else ~e
        right = value(right_node)
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, list):
                raise QueryError(f"{flag}: 'in' needs a list of constants, e.g. attention in ['causal', 'prefix']")
            e = left.isin(right)
            return e if isinstance(op, ast.In) else ~e
        if right is None and isinstance(op, (ast.Eq, ast.NotEq)):
            e = left.is_null()
            return e if isinstance(op, ast.Eq) else ~e
        if type(op) not in _CMP:
            raise QueryError(f"{flag}: unsupported comparison {type(op).__name__}")
        return _CMP[type(op)](left, right)

    def boolean(node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [boolean(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~boolean(node.operand)
        if isinstance(node, ast.Compare):
            left = value(node.left)
            out = None
            for op, right_node in zip(node.ops, node.comparators):
                e = compare(op, left, right_node)
                out = e if out is None else (out & e)
                left = value(right_node)
            return out
        if isinstance(node, ast.Name):
            return value(node)  # a boolean column
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return pc.scalar(node.value)
        raise QueryError(f"{flag}: unsupported expression {ast.unparse(node)!r}; use comparisons "
                         "(==, !=, <, <=, >, >=, in, is None) joined by and/or/not")

    return boolean(tree.body)


def apply_where(table: pa.Table, text: Optional[str], flag: str = "--where") -> pa.Table:
    if not text:
        return table
    expr = compile_where(text, table.column_names, flag)
    try:
        return table.filter(expr)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise QueryError(f"{flag}: {text!r}: {e}") from None
