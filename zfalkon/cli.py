"""The ``zfalkon`` command: a thin argparse layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from zfalkon._version import __version__
from zfalkon.constants import BROKER_ENV, DEFAULT_PORT, OUTPUT_CAP_BYTES
from zfalkon.errors import ZfalkonError


def _broker(args: argparse.Namespace) -> int:
    from zfalkon.broker import run_broker

    return run_broker(args.listen)


def _worker(args: argparse.Namespace) -> int:
    from zfalkon.worker import run_worker

    return run_worker(args.broker, slots=args.slots, name=args.name, tags=args.tag,
                      output_cap=args.output_cap, log_level=args.log_level)


def _status(args: argparse.Namespace) -> int:
    from zfalkon.client import query_status

    info = query_status(args.broker, timeout=args.timeout)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"broker {args.broker or ''} zfalkon {info['version']} (protocol {info['protocol']}), "
          f"up {info['uptime']:.0f} s")
    print(f"workers {info['workers']}  slots {info['slots']}  clients {info['clients']}")
    print(f"queued {info['queued']}  running {info['running']}  done {info['done']}  "
          f"failed {info['failed']}  tasks/s {info['tasks_per_second']:.1f}")
    for w in info["worker_list"]:
        print(f"  {w['name']:<28} {w['connected_slots']}/{w['slots']} slots  "
              f"running {w['running']:<6} done {w['done']:<10} v{w['version']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zfalkon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"zfalkon {__version__}")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a broker")
    p.add_argument("--listen", default=f"tcp://0.0.0.0:{DEFAULT_PORT}",
                   help=f"tcp://HOST:PORT to listen on (default port {DEFAULT_PORT}; 0 = any)")
    p.set_defaults(func=_broker)

    p = sub.add_parser("worker", help="run a worker agent that connects out to a broker")
    p.add_argument("--broker", required=True, help="tcp://HOST:PORT of the broker")
    p.add_argument("--slots", type=int, default=None, help="concurrent tasks (default: cores)")
    p.add_argument("--name", default=None, help="worker name (default: host-pid)")
    p.add_argument("--tag", action="append", default=[], help="a tag to register (repeatable)")
    p.add_argument("--output-cap", type=int, default=OUTPUT_CAP_BYTES,
                   help="bytes of stdout/stderr kept per shell task")
    p.set_defaults(func=_worker)

    p = sub.add_parser("status", help="show a broker's counters and workers")
    p.add_argument("--broker", default=None, help=f"tcp://HOST:PORT (default ${BROKER_ENV})")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zfalkon`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s zfalkon-{args.command} %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ZfalkonError as exc:
        print(f"zfalkon {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
