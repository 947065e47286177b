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
@click.argument("formula_arg", metavar="[FORMULA]", required=False)
@click.option("--formula", help='An lme4 formula, e.g. "Reaction ~ Days + (Days | Subject)"; '
              "categorical columns and their levels come from the data, as in lme4.")
@click.option("--response", help="One-term shorthand: the column holding y.")
@click.option("--fixed", help='One-term shorthand: fixed terms, comma separated; "1" is the '
              "intercept.")
@click.option("--random", "random_", help='One-term shorthand: random terms, e.g. "1,Days".')
@click.option("--group", multiple=True, help="One-term shorthand: the column holding the group id.")
@click.option("--covariance", type=click.Choice(["unstructured", "diagonal"]),
              default="unstructured", show_default=True,
              help="One-term shorthand: unstructured = lme4 (1 + x | g); diagonal = (1 + x || g).")
@click.option("--method", type=click.Choice(["REML", "ML", "EM"], case_sensitive=False),
              default="REML", show_default=True)
@click.option("--tol", type=float, default=1e-10, show_default=True,
              help="Relative tolerance on the criterion.")
@click.option("--max-iter", type=int, default=500, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-ranef", is_flag=True, help="Leave conditional modes out of --json output.")
def fit(data: str, formula_arg: str | None, formula: str | None, response: str | None,
        fixed: str | None, random_: str | None, group: tuple[str, ...], covariance: str,
        method: str, tol: float, max_iter: int, as_json: bool, no_ranef: bool) -> None:
    """Fit a linear mixed model to a CSV / JSON-lines / Parquet file (batch, same engine).

    Example: streamlme fit sleep.csv "Reaction ~ Days + (Days | Subject)"
    """
    from streamlme.data import DataFileError, read_table
    from streamlme.estimate import DataError
    from streamlme.lmm import lmer

    try:
        spec_or_formula = _fit_model(formula_arg, formula, response, fixed, random_, group,
                                     covariance)
        frame = read_table(data, _text_columns(spec_or_formula))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = lmer(spec_or_formula, frame, method=method.upper(), tol=tol,
                          max_iter=max_iter, ranef=not no_ranef)
    except (SpecError, DataFileError, DataError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        emit_json(result.fit.to_dict(ranef=not no_ranef))
    else:
        click.echo(result.summary())
    if not result.fit.converged:
        sys.exit(1)


def _fit_model(formula_arg: str | None, formula: str | None, response: str | None,
               fixed: str | None, random_: str | None, group: tuple[str, ...],
               covariance: str) -> ModelSpec | str:
    """The formula, or the spec the one-term shorthand options describe."""
    shorthand = {"--response": response, "--fixed": fixed, "--random": random_,
                 "--group": group or None}
    given = formula or formula_arg
    if formula and formula_arg:
        raise SpecError("give the formula once: as the second argument or as --formula")
    if given:
        extra = [k for k, v in shorthand.items() if v]
        if extra:
            raise SpecError(f"{', '.join(extra)} describe the model a formula describes; "
                            "give the formula or the one-term options, not both")
        return given
    if len(group) > 1:
        raise SpecError("--group names one grouping factor; for several (nested or crossed), "
                        'use --formula, e.g. --formula "y ~ x + (1 | plate) + (1 | sample)"')
    missing = [k for k, v in shorthand.items() if not v]
    if missing:
        raise SpecError(f"missing {', '.join(missing)}: give a formula such as "
                        '"y ~ x + (1 | g)" or all of --response, --fixed, --random, --group')
    return ModelSpec(response=response, fixed=fixed.split(","),  # type: ignore[union-attr]
                     random=random_.split(","), group=group[0],  # type: ignore[union-attr]
                     covariance=covariance)


def _text_columns(model: ModelSpec | str) -> tuple[str, ...]:
    """Grouping columns, to be read as text; a formula's are found without its data."""
    if isinstance(model, ModelSpec):
        return model.grouping_columns
    from streamlme.formula import grouping_columns

    return grouping_columns(model)


def _load(config_path: str):  # -> Config
    from streamlme.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _metrics(port: int | None) -> None:
    if port is not None:
        from streamlme.metrics import start_metrics_server

        start_metrics_server(port)


@main.group()
def config() -> None:
    """Configuration files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a TOML configuration; exit 2 naming every problem."""
    from streamlme.config import check_config_file

    ok, message = check_config_file(path)
    click.echo(message, err=not ok)
    sys.exit(0 if ok else 2)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML configuration.")
@click.option("--max-events", type=int, default=None, help="Stop after this many events.")
@click.option("--until-idle", type=float, default=None,
              help="Stop after this many seconds without events.")
@click.option("--input", "input_path", default=None,
              help="Read JSON lines from this file (- for stdin) instead of Kafka.")
@click.option("--dead-letters", "dead_letters", default=None, type=click.Path(dir_okay=False),
              help="With --input: append refused lines to this JSON-lines file, with reasons.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve this process's Prometheus metrics at http://127.0.0.1:PORT/metrics.")
def consume(config_path: str, max_events: int | None, until_idle: float | None,
            input_path: str | None, dead_letters: str | None, metrics_port: int | None) -> None:
    """Fold events from Kafka (or JSON lines) into the per-group statistics; prints a JSON report."""
    from streamlme.config import ConfigError
    from streamlme.stream.app import run_consume

    cfg = _load(config_path)
    _logging()
    _metrics(metrics_port)
    if cfg.kafka is None and input_path is None:
        input_path = "-"
    try:
        report = run_consume(cfg, max_events, until_idle, input_path, dead_letters)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    emit_json(report.to_dict())


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def publish(path: str, config_path: str, no_progress: bool) -> None:
    """Send the rows of a CSV / JSON-lines file to the topic, keyed by group."""
    from streamlme.config import ConfigError
    from streamlme.stream.app import run_publish
    from streamlme.stream.publish import PublishError

    cfg = _load(config_path)
    try:
        count = run_publish(cfg, path, progress=not no_progress)
    except (ConfigError, PublishError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    emit_json({"published": count})


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--once", is_flag=True,
              help="Refresh once and exit (cron); exit 1 if no model was written.")
@click.option("--every", default=None, help='Period, e.g. "60s" (default: [refresh] every).')
@click.option("--wait", default=None,
              help="With --once: give up after waiting this long for the lease.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve this process's Prometheus metrics at http://127.0.0.1:PORT/metrics.")
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS",
              help="Fit on the Dask cluster of this scheduler (tcp://host:8786): its workers "
                   "read the shards from Redis. Overrides [refresh] engine/dask_scheduler.")
def refresh(config_path: str, once: bool, every: str | None, wait: str | None,
            metrics_port: int | None, dask_address: str | None) -> None:
    """Re-estimate the model from every group's statistics and write a new model version.

    Only the holder of the refresh lease writes; a second refresher waits as a standby. A fit
    that fails or does not converge never replaces the current model."""
    from streamlme.config import ConfigError, parse_duration
    from streamlme.refresh import RefreshSettings, run_refresh

    if once and every:
        raise click.UsageError("--once and --every exclude each other")
    cfg = _load(config_path)
    _logging()
    _metrics(metrics_port)
    try:
        period = parse_duration(every) if every else None
        patience = parse_duration(wait) if wait else None
    except (ValueError, ConfigError) as exc:
        raise click.BadParameter(str(exc)) from exc
    settings = (RefreshSettings.from_config(cfg, engine="dask", dask_scheduler=dask_address)
                if dask_address else None)
    sys.exit(run_refresh(cfg, once=once, every=period, wait=patience, settings=settings))


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (fit --json fields).")
@click.option("--history", is_flag=True, help="List stored versions.")
@click.option("--rollback", "rollback_to", type=int, default=None, metavar="V",
              help="Make version V the current model.")
def model(config_path: str, as_json: bool, history: bool, rollback_to: int | None) -> None:
    """Show the current model, the version history, or roll back to an older version."""
    from streamlme.refresh import model_command

    status, text = model_command(_load(config_path), as_json=as_json, history=history,
                                 rollback_to=rollback_to)
    click.echo(text, err=status != 0)
    sys.exit(status)


@main.command()
@click.argument("groups", nargs=-1, required=True)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group, in the order asked.")
@click.option("--term", default=None, metavar="FACTOR",
              help="The grouping factor whose levels GROUPS are (e.g. doctor, hospital:doctor); "
                   "needed for models with several terms.")
def effect(groups: tuple[str, ...], config_path: str, as_json: bool, term: str | None) -> None:
    """The current offset (BLUP) of each GROUP, with its covariance and shrinkage.

    Computed from the group's running statistics and the current model; a group never seen
    gets zeros, the prior covariance G and "known": false. With --term, each GROUP is a level
    of that factor and its line adds term, level, cells and solution ("exact" for one term and
    nested terms; "gauss_seidel" for crossed terms between refreshes)."""
    from redis.exceptions import RedisError

    from streamlme.client import ModelNotReady, TermRequired, UnknownTermError, effect_lines
    from streamlme.config import ConfigError
    from streamlme.stats import StatsError
    from streamlme.store.errors import StoreError
    from streamlme.store.keys import KeyNameError

    try:
        lines = effect_lines(config_path, list(groups), as_json=as_json, term=term)
    except (ModelNotReady, ConfigError, KeyNameError, StoreError, StatsError, TermRequired,
            UnknownTermError) as exc:
        raise click.ClickException(str(exc)) from exc
    except RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from exc
    for line in lines:
        click.echo(line)


@main.group()
def store() -> None:
    """The state store's layout."""


@store.command("migrate")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The configuration whose [redis] namespace to migrate.")
def store_migrate(config_path: str) -> None:
    """Move a namespace of streamlme 0.1 (one Redis slot) to the sharded layout, in place.

    Stop the consumers first; a stopped migration can be run again. Prints a JSON report.
    Example: streamlme store migrate --config streamlme.toml
    """
    from streamlme.store.connect import redis_client
    from streamlme.store.errors import StoreError
    from streamlme.store.migrate import migrate
    from streamlme.store.redis import RedisStore

    cfg = _load(config_path)
    if cfg.redis is None:
        click.echo(f"{cfg.source}: redis: not configured; the in-process store has no layout "
                   "to migrate", err=True)
        sys.exit(2)
    r = cfg.redis
    client = redis_client(r.url, cluster=r.cluster, nodes=r.startup_nodes if r.cluster else ())
    try:
        report = migrate(RedisStore(client, r.namespace, shards=r.shards))
    except StoreError as exc:
        click.echo(f"store migrate: {exc}", err=True)
        sys.exit(1)
    finally:
        client.close()
    emit_json(report.__dict__)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML configuration.")
@click.option("--host", default=None, help="Address to listen on (default: [api] host, "
              "127.0.0.1; 0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on (default: [api] port, 8000).")
def serve(config_path: str, host: str | None, port: int | None) -> None:
    """The HTTP API: group effects, predictions, models, health and Prometheus metrics.

    Starts even while Redis is down (/readyz says "waiting for Redis at ..."); refuses, with
    exit 1, a namespace holding statistics of other columns than the model's.
    Example: streamlme serve --config streamlme.toml --port 8000
    """
    import msgspec

    from streamlme.api.app import serve as run_server
    from streamlme.store.errors import StoreError

    cfg = _load(config_path)
    cfg.api = msgspec.structs.replace(cfg.api, **{k: v for k, v in (("host", host),
                                                                    ("port", port))
                                             if v is not None})
    _logging()
    try:
        run_server(cfg)
    except StoreError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


@main.command()
@click.argument("kind", type=click.Choice(["shrinkage", "caterpillar", "trace"]))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--term", default="0", show_default=True,
              help="caterpillar: the random term, by name or index.")
@click.option("--top", type=int, default=None, help="caterpillar: only the N largest effects.")
def plot(kind: str, config_path: str, out: str, term: str, top: int | None) -> None:
    """Plot the current model: shrinkage, caterpillar (effects with 95% intervals), or the trace
    of variance components across model versions."""
    from streamlme.config import ConfigError
    from streamlme.plots import PlotError, plot_command

    try:
        path = plot_command(kind, config_path, out, term=int(term) if term.isdigit() else term,
                            top=top)
    except (PlotError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@main.command()
@click.option("--groups", type=int, default=200, show_default=True)
@click.option("--events", type=int, default=100_000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--out", default="streamlme-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the events, the embedded state and the plots.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Run through this configuration's Kafka and Redis instead of the embedded store.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(groups: int, events: int, seed: int, out: str, config_path: str | None,
         as_json: bool) -> None:
    """Stream a simulated hospital length-of-stay data set through the consumer and the refresh."""
    from streamlme.demo import run_demo

    report = run_demo(n_groups=groups, n_events=events, seed=seed, out=out,
                      config_path=config_path, echo=not as_json)
    if as_json:
        emit_json(report)


if __name__ == "__main__":
    main()
