"""Doctests of the package run with the tests (pyproject's --doctest-modules); a module whose
optional dependency is missing here is left out rather than failing collection."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("river") else ["streamlme/river.py"]
