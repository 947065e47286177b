"""The `streamlme` command. Its JSON outputs are a public contract: add fields, never rename."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click
import numpy as np

from streamlme.spec import ModelSpec, SpecError


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, default=_json_default, allow_nan=False))


@click.group()
@click.version_option(package_name="streamlme")
def main() -> None:
    """streamlme: a linear mixed-effects model kept live over an event stream."""


@main.command()
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--response", required=True, help="Column holding y.")
@click.option("--fixed", required=True, help='Fixed terms, comma separated; "1" is the intercept.')
@click.option("--random", "random_", required=True, help='Random terms per group, e.g. "1,Days".')
@click.option("--group", required=True, help="Column holding the group id.")
@click.option("--covariance", type=click.Choice(["unstructured", "diagonal"]),
              default="unstructured", show_default=True,
              help="unstructured = lme4 (1 + x | g); diagonal = lme4 (1 + x || g).")
@click.option("--method", type=click.Choice(["REML", "ML", "EM"], case_sensitive=False),
              default="REML", show_default=True)
@click.option("--tol", type=float, default=1e-10, show_default=True,
              help="Relative tolerance on the criterion.")
@click.option("--max-iter", type=int, default=500, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-ranef", is_flag=True, help="Leave conditional modes out of --json output.")
def fit(data: str, response: str, fixed: str, random_: str, group: str, covariance: str,
        method: str, tol: float, max_iter: int, as_json: bool, no_ranef: bool) -> None:
    """Fit a linear mixed model to a CSV / JSON-lines / Parquet file (batch, same engine)."""
    from streamlme.data import DataFileError, stats_from_file
    from streamlme.estimate import DataError
    from streamlme.estimate import fit as fit_stats

    try:
        spec = ModelSpec(response=response, fixed=fixed.split(","), random=random_.split(","),
                         group=group, covariance=covariance, method=method.upper())
        stats = stats_from_file(data, spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit_stats(stats, spec, tol=tol, max_iter=max_iter, ranef=not no_ranef)
    except (SpecError, DataFileError, DataError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        emit_json(result.to_dict(ranef=not no_ranef))
    else:
        click.echo(f"Formula: {spec.formula}")
        click.echo(result.summary())
    if not result.converged:
        sys.exit(1)


@main.command()
@click.option("--groups", type=int, default=200, show_default=True)
@click.option("--events", type=int, default=100_000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(groups: int, events: int, seed: int, as_json: bool) -> None:
    """Stream a simulated hospital length-of-stay data set through the embedded engine."""
    from streamlme.demo import run_demo

    report = run_demo(n_groups=groups, n_events=events, seed=seed, echo=not as_json)
    if as_json:
        emit_json(report)


if __name__ == "__main__":
    main()
