"""``python -m streamlme.stream consume|publish ...``: the stream commands without the full CLI.

Used by the tests' subprocesses; `streamlme consume` / `streamlme publish` do the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from streamlme.config import ConfigError, load_config
from streamlme.stream.app import run_consume, run_publish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamlme.stream")
    sub = parser.add_subparsers(dest="command", required=True)
    consume = sub.add_parser("consume", help="fold events into the store")
    consume.add_argument("--config", required=True)
    consume.add_argument("--max-events", type=int)
    consume.add_argument("--until-idle", type=float)
    consume.add_argument("--input", help="JSON-lines file, or - for stdin (embedded mode)")
    publish = sub.add_parser("publish", help="send a CSV / JSON-lines file to the topic")
    publish.add_argument("path")
    publish.add_argument("--config", required=True)
    publish.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "consume":
        report = run_consume(config, args.max_events, args.until_idle, args.input)
        print(json.dumps(report.to_dict()), flush=True)
    else:
        count = run_publish(config, args.path, progress=not args.no_progress)
        print(json.dumps({"published": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
