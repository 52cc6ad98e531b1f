"""The ``zfalkon`` command: a thin argparse layer over the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Iterator

from zfalkon._version import __version__
from zfalkon.constants import BROKER_ENV, DEFAULT_PORT, KEY_DIR_ENV, KEYS_ENV, OUTPUT_CAP_BYTES
from zfalkon.client import Executor
from zfalkon.cluster import LocalCluster
from zfalkon.errors import ConfigError, ZfalkonError
from zfalkon.broker import DISPATCH_POLICIES
from zfalkon.cache import CACHE_BYTES
from zfalkon.journal import FSYNC_POLICIES


def _broker(args: argparse.Namespace) -> int:
    from zfalkon.broker import run_broker

    return run_broker(args.listen, journal=args.journal, fsync=args.fsync, keys=args.keys,
                      insecure=args.insecure, dispatch=args.dispatch,
                      journal_repair=args.journal_repair)


def _worker(args: argparse.Namespace) -> int:
    from zfalkon.worker import run_worker

    return run_worker(args.broker, slots=args.slots, name=args.name, tags=args.tag,
                      output_cap=args.output_cap, log_level=args.log_level, keys=args.keys,
                      ready_file=args.ready_file, idle_exit=args.idle_exit,
                      cache_dir=args.cache_dir, cache_bytes=args.cache_bytes)


def _vm_agent(args: argparse.Namespace) -> int:
    from zfalkon.vmagent import run_vm_agent

    return run_vm_agent(args.config)


def _keys(args: argparse.Namespace) -> int:
    from zfalkon import security

    if args.keys_command == "init":
        public = security.init_keys(args.dir)
        print(f"created broker keys in {args.dir}; the broker's public key is {public}\n"
              f"start the broker with: zfalkon broker --keys {args.dir}")
    elif args.keys_command == "new":
        bundle = security.new_key(_key_dir(args), args.name, args.role, args.out)
        print(f"authorized {args.role} key {args.name!r}; its bundle (secret: copy it "
              f"privately) is {bundle}\nuse it with: --keys {bundle}")
    elif args.keys_command == "list":
        for k in security.list_keys(_key_dir(args)):
            print(f"{k.role:<7} {k.name:<32} {k.public}{'  REVOKED' if k.revoked else ''}")
    else:
        k = security.revoke(_key_dir(args), args.name)
        print(f"revoked {k.role} key {k.name!r}: new connections with it are refused")
    return 0


def _key_dir(args: argparse.Namespace) -> str:
    directory = args.dir or os.environ.get(KEY_DIR_ENV)
    if not directory:
        raise ConfigError(f"name the broker's key directory: --dir DIR or ${KEY_DIR_ENV}")
    return directory


def _status(args: argparse.Namespace) -> int:
    from zfalkon.client import query_status

    info = query_status(args.broker, timeout=args.timeout, keys=args.keys)
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
              f"running {w['running']:<6} done {w['done']:<10} v{w['version']}"
              + ("  DRAINING" if w.get("draining") else ""))
    return 0


@contextlib.contextmanager
def _executor(broker: str | None, workers: int | None, keys: str | None) -> Iterator[Executor]:
    """An Executor on ``broker`` ($ZFALKON_BROKER), else on a LocalCluster of ``workers``."""
    broker = broker or (None if workers else os.environ.get(BROKER_ENV))
    if broker:
        with Executor(broker, keys=keys) as ex:
            yield ex
    else:
        with LocalCluster(workers=workers or os.cpu_count() or 1) as cluster, \
                Executor(cluster.address) as ex:
            yield ex


def _run(args: argparse.Namespace) -> int:
    from zfalkon import runfile

    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    name = "standard input" if args.taskfile == "-" else args.taskfile
    try:
        source = runfile.spool(sys.stdin.buffer) if args.taskfile == "-" else \
            open(args.taskfile, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read task file: {exc}") from None
    with source:
        checked = runfile.check_task_file(source)  # every line, before anything runs
        if checked.bad:
            print("\n".join(checked.report(name)), file=sys.stderr)
            return runfile.EXIT_BAD_TASKFILE
        source.seek(0)
        summary = runfile.RunSummary()
        try:
            out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        except OSError as exc:
            raise ConfigError(f"cannot write the output: {exc}") from None
        try:
            with _executor(args.broker, args.workers, args.keys) as ex:
                runfile.run_tasks(ex, runfile.iter_tasks(source), out, timeout=args.timeout,
                                  total=checked.tasks, progress=sys.stderr.isatty(),
                                  summary=summary)
        except ZfalkonError as exc:
            if not summary.total:
                raise  # nothing submitted: the usual error and status
            print(f"zfalkon run: stopped after submitting {summary.total} of {checked.tasks} "
                  f"tasks: {exc}\nzfalkon run: the {summary.written} results received are "
                  f"written to {args.output or 'standard output'}", file=sys.stderr)
            return runfile.EXIT_STOPPED
        finally:
            if out is not sys.stdout:
                out.close()
    if not summary.ok or sys.stderr.isatty():
        print(runfile.describe_failures(summary), file=sys.stderr)
    return 0 if summary.ok else 1


def _bench(args: argparse.Namespace) -> int:
    from zfalkon.bench import format_table, run_bench

    figures = run_bench(args.broker, workers=args.workers, slots=args.slots, tasks=args.tasks,
                        kind=args.kind, task_seconds=args.task_seconds, repeat=args.repeat,
                        rtt_ms=args.rtt_ms, swarm=args.swarm, secure=args.secure,
                        progress=sys.stderr.isatty() and not args.json)
    print(json.dumps(figures) if args.json else format_table(figures))
    return 0 if figures["errors"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zfalkon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"zfalkon {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a broker")
    p.add_argument("--listen", default=f"tcp://0.0.0.0:{DEFAULT_PORT}",
                   help=f"tcp://HOST:PORT to listen on (default port {DEFAULT_PORT}; 0 = any)")
    p.add_argument("--journal", metavar="DIR",
                   help="log accepted tasks and results in DIR; a restarted broker runs "
                        "every unfinished task again (see README, Delivery semantics)")
    p.add_argument("--fsync", choices=FSYNC_POLICIES, default="interval",
                   help="when the journal is flushed to disk: after every write "
                        "(always), once a second (interval, default) or never; a killed "
                        "broker loses nothing either way, a crashed machine up to that")
    p.add_argument("--journal-repair", action="store_true",
                   help="if the journal is damaged, keep it as journal.log.corrupt-TIME, "
                        "rewrite it with every valid record found, and start")
    p.add_argument("--keys", metavar="DIR",
                   help="broker key directory (zfalkon keys init): CurveZMQ encryption, and "
                        "only allow-listed worker and client keys may connect")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without --keys")
    p.add_argument("--dispatch", choices=DISPATCH_POLICIES, default="data",
                   help="data (default): send tasks with an S3 input to workers whose cache "
                        "holds it first; fifo: plain arrival order")
    p.set_defaults(func=_broker)

    p = sub.add_parser("keys", help="create, list and revoke CurveZMQ keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("init", help="create a broker key directory")
    k.add_argument("dir")
    k = keys.add_parser("new", help="create and authorize a worker or client key")
    k.add_argument("name")
    k.add_argument("--role", choices=["worker", "client"], required=True)
    k.add_argument("--dir", help=f"the broker's key directory (default ${KEY_DIR_ENV})")
    k.add_argument("--out", help="where to write the bundle (default DIR/issued/NAME)")
    k = keys.add_parser("list", help="list authorized and revoked keys")
    k.add_argument("--dir", help=f"the broker's key directory (default ${KEY_DIR_ENV})")
    k = keys.add_parser("revoke", help="take a key's authorization back (no restart needed)")
    k.add_argument("name")
    k.add_argument("--dir", help=f"the broker's key directory (default ${KEY_DIR_ENV})")
    p.set_defaults(func=_keys)

    p = sub.add_parser("worker", help="run a worker agent that connects out to a broker")
    p.add_argument("--broker", required=True, help="tcp://HOST:PORT of the broker")
    p.add_argument("--slots", type=int, default=None, help="concurrent tasks (default: cores)")
    p.add_argument("--name", default=None, help="worker name (default: host-pid)")
    p.add_argument("--tag", action="append", default=[], help="a tag to register (repeatable)")
    p.add_argument("--output-cap", type=int, default=OUTPUT_CAP_BYTES,
                   help="bytes of stdout/stderr kept per shell task")
    p.add_argument("--keys", metavar="BUNDLE",
                   help="this worker's key bundle (zfalkon keys new NAME --role worker)")
    p.add_argument("--ready-file", metavar="PATH", help="write PATH once registered")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache of staged S3 inputs, shared by the slots (default: a "
                        "temporary directory removed at exit)")
    p.add_argument("--cache-bytes", type=int, default=CACHE_BYTES,
                   help=f"cache size limit, least recently used files evicted first "
                        f"(default {CACHE_BYTES}; 0: no cache, download every time)")
    p.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                   help="drain and exit after this long without a task (default 0: never)")
    p.set_defaults(func=_worker)

    from zfalkon.provision.cli import add_parsers

    add_parsers(sub)

    p = sub.add_parser("vm-agent", help="run a worker on a cloud VM (started by systemd)")
    p.add_argument("--config", default="/etc/zfalkon/worker.json")
    p.set_defaults(func=_vm_agent)

    p = sub.add_parser("status", help="show a broker's counters and workers")
    p.add_argument("--broker", default=None, help=f"tcp://HOST:PORT (default ${BROKER_ENV})")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--keys", metavar="BUNDLE", help=f"client key bundle (default ${KEYS_ENV})")
    p.set_defaults(func=_status)

    p = sub.add_parser("run", help="run a task file: one shell command per line")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--broker", default=None,
                       help=f"tcp://HOST:PORT (default ${BROKER_ENV}, else a local cluster)")
    where.add_argument("--workers", type=int, default=None,
                       help="run on a local cluster of N workers (default: cores)")
    p.add_argument("--output", "-o", default=None, help="JSON lines file (default stdout)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per task")
    p.add_argument("taskfile", help="task file, or - for standard input")
    p.add_argument("--keys", metavar="BUNDLE", help=f"client key bundle (default ${KEYS_ENV})")
    p.set_defaults(func=_run)

    p = sub.add_parser("bench", help="measure tasks per second")
    p.add_argument("--broker", default=None, help="tcp://HOST:PORT (default: a local cluster)")
    p.add_argument("--workers", type=int, default=2, help="local cluster workers (default 2)")
    p.add_argument("--slots", type=int, default=1, help="slots per local worker (default 1)")
    p.add_argument("--tasks", type=int, default=200_000, help="tasks per run (default 200000)")
    p.add_argument("--kind", choices=["noop", "sleep", "shell"], default="noop")
    p.add_argument("--task-seconds", type=float, default=0.0,
                   help="task length for sleep and shell kinds")
    p.add_argument("--repeat", type=int, default=1, help="runs; figures are medians")
    p.add_argument("--rtt-ms", type=float, default=0.0,
                   help="put the workers behind an emulated link of this round trip")
    p.add_argument("--swarm", type=int, default=0, metavar="N",
                   help="N simulated workers (sleep tasks without processes) instead of real ones")
    p.add_argument("--secure", action="store_true",
                   help="local cluster with CurveZMQ keys (measures encryption's cost)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)
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
