"""lme4 formulas -> ModelSpec.

The grammar is lme4's for linear mixed models::

    response ~ fixed + (expr | g) + (expr || g) + (expr | g:h) + (expr | g/h) ...

The bar terms are read here; the fixed part and each bar's left-hand side are Wilkinson formulas,
read by formulaic (``0 +`` and ``- 1`` drop the intercept, ``a:b`` and ``a*b`` interact). ``g/h``
expands to ``g + g:h`` as in lme4. A categorical covariate is written ``C(sex, levels=["F", "M"])``
or named in ``levels``, and is coded as R codes it: treatment contrasts against the first level
where the term without it is in the model (a main effect beside an intercept), one indicator per
level where it is not (``0 + sex``).

>>> spec = parse("Reaction ~ Days + (Days | Subject)")
>>> spec.fixed, spec.random, spec.group
(('1', 'Days'), ('1', 'Days'), 'Subject')
>>> spec = parse('y ~ 0 + C(sex, levels=["F", "M"]) + age + (1 | h/d) + (0 + age || s)')
>>> spec.fixed, [t.formula() for t in spec.terms]
(('sexF', 'sexM', 'age'), ['(1 | h)', '(1 | h:d)', '(0 + age || s)'])
>>> parse("y ~ x + (1 | )")
Traceback (most recent call last):
...
streamlme.formula.FormulaError: at character 13: expected a grouping factor after '|'
  y ~ x + (1 | )
               ^
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import product

from streamlme.spec import INTERCEPT, Atom, ModelSpec, RandomTerm, SpecError

#: Answers the levels of a column that is categorical in the data at hand (None: numeric).
LevelsOf = Callable[[str], "Sequence[str] | None"]

_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$|^`[^`]+`$")
_MARK = re.compile("\u29db(?:\x1b\\[[0-9;]*m)?")


class FormulaError(SpecError):
    """A formula that does not parse; the message points at the character."""

    def __init__(self, formula: str, at: int, expected: str) -> None:
        self.formula, self.at, self.expected = formula, at, expected
        super().__init__(f"at character {at}: {expected}\n  {formula}\n  {' ' * at}^")


def parse(
    formula: str, *, levels: Mapping[str, Sequence[str]] | None = None, method: str = "REML",
    levels_of: LevelsOf | None = None,
) -> ModelSpec:
    """The ModelSpec of an lme4 formula.

    ``levels`` declares categorical columns and their levels (first level the reference).
    ``levels_of`` is asked about every other column a term names, so that a fit on data can
    take categorical columns and their levels from the data, as lme4 does.
    """
    if not isinstance(formula, str):
        raise SpecError(f"formula: expected a string such as 'y ~ x + (1 | g)', got {formula!r}")
    text = formula.strip()
    tilde = text.find("~")
    if tilde < 0:
        raise FormulaError(text, len(text), "expected '~' between the response and the terms")
    response = text[:tilde].strip()
    if not response:
        raise FormulaError(text, 0, "expected the response column before '~'")
    if not _NAME.match(response):
        raise FormulaError(text, 0, f"expected a column name as the response, got {response!r}")
    pieces = _split_top(text, tilde + 1)
    fixed_pieces: list[tuple[int, str]] = []
    terms: list[RandomTerm] = []
    bars: list[tuple[int, str, str, str, int]] = []
    for start, piece in pieces:
        bar = _bar(text, start, piece)
        if bar is None:
            fixed_pieces.append((start, piece))
        else:
            bars.append((start, *bar))
    if not bars:
        raise FormulaError(text, len(text), "expected at least one random-effect term such as "
                           "(1 | g)")
    coder = _Coder(text, dict(levels or {}), levels_of)
    fixed = coder.columns(fixed_pieces, random=False)
    for start, lhs, op, group, at in bars:
        random = coder.columns([(start + 1, lhs)], random=True)
        for factors in _factors(text, at, group):
            terms.append(RandomTerm(tuple(random), factors,
                                    "unstructured" if op == "|" else "diagonal"))
    return ModelSpec(_unquote(response), fixed, method=method, terms=terms, levels=coder.levels,
                     design=coder.design, formula=" ".join(text.split()))


def grouping_columns(formula: str) -> tuple[str, ...]:
    """The grouping columns of a formula's bar terms, read without parsing the rest."""
    text = formula.strip()
    tilde = text.find("~")
    if tilde < 0:
        raise FormulaError(text, len(text), "expected '~' between the response and the terms")
    out: list[str] = []
    for start, piece in _split_top(text, tilde + 1):
        bar = _bar(text, start, piece)
        if bar is not None:
            for factors in _factors(text, bar[3], bar[2]):
                out += [f for f in factors if f not in out]
    return tuple(out)


def _split_top(text: str, begin: int) -> list[tuple[int, str]]:
    """The rhs split at top-level ``+``: (start index, piece) with balanced parentheses."""
    pieces: list[tuple[int, str]] = []
    depth, start = 0, begin
    for i in range(begin, len(text)):
        ch = text[i]
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise FormulaError(text, i, "unmatched ')'")
        elif ch == "+" and depth == 0:
            pieces.append((start, text[start:i]))
            start = i + 1
    if depth > 0:
        raise FormulaError(text, len(text), "expected ')' to close the '(' opened before")
    pieces.append((start, text[start:]))
    out = []
    for s, p in pieces:
        if not p.strip():
            raise FormulaError(text, s + len(p), "expected a term between '+' signs")
        lead = len(p) - len(p.lstrip())
        out.append((s + lead, p.strip()))
    return out


def _bar(text: str, start: int, piece: str) -> tuple[str, str, str, int] | None:
    """(lhs, '|' or '||', factor, factor's index in text) if ``piece`` is ``(lhs | factor)``."""
    if not (piece.startswith("(") and piece.endswith(")")):
        return None
    inner = piece[1:-1]
    depth = 0
    for i, ch in enumerate(inner):
        depth += (ch == "(") - (ch == ")")
        if ch == "|" and depth == 0:
            op = "||" if inner.startswith("||", i) else "|"
            lhs, rhs = inner[:i].strip(), inner[i + len(op):].strip()
            at = start + 1 + i + len(op) + 1
            if not lhs:
                raise FormulaError(text, start + 1, f"expected random terms before '{op}', "
                                   "such as 1 or 1 + x")
            if not rhs:
                raise FormulaError(text, at, f"expected a grouping factor after '{op}'")
            return lhs, op, rhs, at
    return None


def _factors(text: str, at: int, group: str) -> list[tuple[str, ...]]:
    """``g`` -> [(g,)], ``g:h`` -> [(g, h)], ``g/h/k`` -> [(g,), (g, h), (g, h, k)]."""
    group = group.strip()
    if group.startswith("(") and group.endswith(")"):
        group = group[1:-1]
    out: list[tuple[str, ...]] = []
    prefix: tuple[str, ...] = ()
    for part in group.split("/"):
        names = [n.strip() for n in part.split(":")]
        for n in names:
            if not _NAME.match(n):
                raise FormulaError(text, at, f"expected a grouping column name, got {n!r} "
                                   "(factors are columns joined by ':' or '/')")
        prefix = (*prefix, *(_unquote(n) for n in names))
        out.append(prefix)
    return out


def _unquote(name: str) -> str:
    return name[1:-1] if name.startswith("`") and name.endswith("`") else name


class _Coder:
    """Turns Wilkinson terms into design columns, collecting categorical levels on the way."""

    def __init__(self, text: str, levels: dict[str, Sequence[str]],
                 levels_of: LevelsOf | None) -> None:
        self.text = text
        self.levels: dict[str, tuple[str, ...]] = {k: tuple(map(str, v))
                                                    for k, v in levels.items()}
        self.levels_of = levels_of
        self.design: dict[str, tuple[Atom, ...]] = {}

    def columns(self, pieces: list[tuple[int, str]], random: bool) -> list[str]:
        """Design column names of these pieces of one formula part ("1" for the intercept)."""
        from formulaic import Formula
        from formulaic.errors import FormulaSyntaxError

        if not pieces:
            return ["1"] if not random else []
        rhs = " + ".join(p for _, p in pieces)
        try:
            terms = list(Formula("~ " + rhs))
        except (FormulaSyntaxError, ValueError) as exc:
            raise self._locate(pieces, exc) from None
        factor_sets: list[tuple[str, ...]] = []
        for term in terms:
            names = tuple(self._factor(pieces, f.expr) for f in term.factors)
            factor_sets.append(tuple(n for n in names if n != "1"))
        present = {frozenset(fs) for fs in factor_sets}
        out: list[str] = []
        for fs in factor_sets:
            if not fs:
                out.append(INTERCEPT)
                continue
            choices: list[list[tuple[str, Atom]]] = []
            for col in fs:
                if col in self.levels:
                    lv = self.levels[col]
                    contrast = frozenset(c for c in fs if c != col) in present
                    choices.append([(f"{col}{v}", (col, v)) for v in (lv[1:] if contrast else lv)])
                else:
                    choices.append([(col, (col, None))])
            for combo in product(*choices):
                name = ":".join(n for n, _ in combo)
                atoms = tuple(a for _, a in combo)
                if atoms != ((name, None),):
                    self.design[name] = atoms
                out.append(name)
        return out

    def _factor(self, pieces: list[tuple[int, str]], expr: str) -> str:
        """The column a formulaic factor names (registering categorical levels)."""
        if expr == "1":
            return "1"
        if _NAME.match(expr):
            col = _unquote(expr)
            if col not in self.levels and self.levels_of is not None:
                found = self.levels_of(col)
                if found is not None:
                    self.levels[col] = tuple(map(str, found))
            return col
        call = _categorical_call(expr)
        if call is None:
            raise FormulaError(self.text, self._where(pieces, expr),
                               f"expected a column name or C(column, levels=[...]), got {expr!r}"
                               " (compute transformed columns before fitting)")
        col, declared = call
        if declared is not None:
            self.levels[col] = declared
        elif col not in self.levels:
            found = self.levels_of(col) if self.levels_of is not None else None
            if found is None:
                raise FormulaError(self.text, self._where(pieces, expr),
                                   f"expected the levels of categorical {col!r}: write "
                                   f'C({col}, levels=["a", "b"]) or declare them in the config')
            self.levels[col] = tuple(map(str, found))
        return col

    def _where(self, pieces: list[tuple[int, str]], expr: str) -> int:
        head = expr.split("(")[0]
        for start, piece in pieces:
            k = piece.find(head)
            if k >= 0:
                return start + k
        return pieces[0][0]

    def _locate(self, pieces: list[tuple[int, str]], exc: Exception) -> FormulaError:
        """Point at the character formulaic complained of, within the piece it was in."""
        from formulaic import Formula

        message = str(exc).split("\n")[0].rstrip(".")
        for start, piece in pieces:
            try:
                Formula("~ " + piece)
            except Exception as inner:  # any failure locates the piece
                marked = str(inner).split("\n")[-1]
                k = marked.find("\u29db")
                at = start + max(k - 2, 0) if k >= 0 else start
                return FormulaError(self.text, at, f"expected a valid term ({message})")
        return FormulaError(self.text, pieces[0][0], f"expected a valid term ({message})")


def _categorical_call(expr: str) -> tuple[str, tuple[str, ...] | None] | None:
    """(column, declared levels or None) for ``C(col)`` / ``C(col, levels=[...])``."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "C" and len(node.args) == 1
            and isinstance(node.args[0], ast.Name)):
        return None
    declared: tuple[str, ...] | None = None
    for kw in node.keywords:
        if kw.arg != "levels":
            return None
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            return None
        if not isinstance(value, (list, tuple)) or not value:
            return None
        declared = tuple(str(v) for v in value)
    return node.args[0].id, declared
