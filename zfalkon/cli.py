"""The ``zfalkon`` command: a thin argparse layer over the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import IO, BinaryIO, Iterator

from zfalkon._version import __version__
from zfalkon.constants import (
    BROKER_ENV,
    CLIENT_AWAY_SECONDS,
    CLIENT_HOLD_SECONDS,
    DEFAULT_PORT,
    KEY_DIR_ENV,
    KEYS_ENV,
    MAX_CRASHES,
    OUTPUT_CAP_BYTES,
)
from zfalkon.client import Executor
from zfalkon.cluster import LocalCluster
from zfalkon.diagnose import explain_no_answer
from zfalkon.errors import BrokerUnavailable, ConfigError, ZfalkonError
from zfalkon.broker import DISPATCH_POLICIES
from zfalkon.cache import CACHE_BYTES
from zfalkon.journal import FSYNC_POLICIES
from zfalkon import protocol as P
from zfalkon import runfile
from zfalkon.watch import NO_WORKER_WARNING_SECONDS, WorkerWatch


def _broker(args: argparse.Namespace) -> int:
    from zfalkon.broker import run_broker

    return run_broker(args.listen, journal=args.journal, fsync=args.fsync, keys=args.keys,
                      insecure=args.insecure, dispatch=args.dispatch,
                      journal_repair=args.journal_repair, max_crashes=args.max_crashes,
                      hold_seconds=args.hold_seconds)


def _worker(args: argparse.Namespace) -> int:
    from zfalkon.worker import run_worker

    return run_worker(args.broker, slots=args.slots, name=args.name, tags=args.tag,
                      output_cap=args.output_cap, log_level=args.log_level, keys=args.keys,
                      ready_file=args.ready_file, idle_exit=args.idle_exit,
                      cache_dir=args.cache_dir, cache_bytes=args.cache_bytes,
                      sandbox=args.sandbox)


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

    if args.watch:
        return _watch_status(args)
    info = query_status(args.broker, timeout=args.timeout, keys=args.keys)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("\n".join(format_status(info, args.broker or os.environ.get(BROKER_ENV, ""))))
    return 0


def _count(n: int, width: int) -> str:
    return f"{n:>{width}}"


def format_status(info: dict, broker: str = "") -> list[str]:
    """``zfalkon status`` as text: counters, one line per worker and per run."""
    window = info.get("rate_window_seconds")
    rate = f"{info['tasks_per_second']:.1f} tasks/s " + (
        f"(last {window:.0f} s)" if window else "(no finished tick yet)")
    lines = [
        f"broker {broker} zfalkon {info['version']} (protocol {info['protocol']}), "
        f"up {info['uptime']:.0f} s",
        f"workers {info['workers']}  slots {info['slots']}  clients {info['clients']} "
        f"(+{info.get('away_clients', 0)} away)",
        f"queued {info['queued']}  running {info['running']}  prefetched "
        f"{info.get('prefetched', 0)}  done {info['done']}  failed {info['failed']}  {rate}"]
    if info["worker_list"]:
        lines.append(f"  {'WORKER':<28} {'SLOTS':>7} {'RUNNING':>8} {'PREFETCH':>8} "
                     f"{'DONE':>10}")
    for w in info["worker_list"]:
        version = f"  v{w['version']}" if "version" in w else ""  # (listed in short)
        lines.append(
            f"  {w['name']!s:<28} {str(w['connected_slots']) + '/' + str(w['slots']):>7} "
            f"{w['running']:>8} {w.get('prefetched', 0):>8} {w['done']:>10}{version}"
            + ("  DRAINING" if w.get("draining") else ""))
    if info.get("workers_omitted"):
        lines.append(f"  ... and {info['workers_omitted']} more workers (STATUS lists a "
                     "bounded number)")
    runs = info.get("runs", [])
    if runs:
        lines += format_runs(runs, info.get("runs_omitted", 0))
    return lines


def format_runs(runs: list[dict], omitted: int = 0) -> list[str]:
    """The runs table of ``zfalkon runs`` and ``zfalkon status``."""
    lines = [f"  {'RUN':>7} {'NAME':<28} {'CLIENT':<9} {'QUEUED':>8} {'RUNNING':>8} "
             f"{'PREFETCH':>8} {'DONE':>8} {'FAILED':>7} {'CANCELLED':>9}"]
    for r in runs:
        name = r["run"] or r["name"]
        state = r["state"] if r["state"] == "connected" else \
            f"away {r['silent_seconds']:.0f}s"
        lines.append(f"  {r['id']:>7} {name[:28]:<28} {state:<9} {r['queued']:>8} "
                     f"{r['running']:>8} {r['prefetched']:>8} {r['done']:>8} "
                     f"{r['failed']:>7} {r['cancelled']:>9}")
    if omitted:
        lines.append(f"  ... and {omitted} more runs (STATUS lists the newest "
                     f"{len(runs)})")
    return lines


def _watch_status(args: argparse.Namespace) -> int:
    """``zfalkon status --watch``: the status again every ``--interval`` seconds, until
    Ctrl-C (exit 0)."""
    from zfalkon.client import query_status

    if not args.interval > 0:
        raise ConfigError("--interval must be a positive number of seconds")
    broker = args.broker or os.environ.get(BROKER_ENV, "")
    tty = sys.stdout.isatty()
    # Ctrl-C (or SIGTERM) ends the watch between queries, never inside one: a
    # KeyboardInterrupt in the middle of ZeroMQ calls could leave the context hanging.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        try:
            lines = format_status(query_status(args.broker, timeout=args.timeout,
                                               keys=args.keys), broker)
        except BrokerUnavailable as exc:  # (it may come back: keep watching)
            lines = [f"zfalkon status: {_cli_words(exc, args)}"]
        if stop.is_set():
            break
        stamp = time.strftime("%H:%M:%S")
        text = "\n".join([f"{stamp}  every {args.interval:g} s, Ctrl-C to stop", *lines])
        print(("\x1b[H\x1b[2J" if tty else "") + text + ("" if tty else "\n"), flush=True)
        stop.wait(args.interval)
    print(flush=True)
    return 0


def _runs(args: argparse.Namespace) -> int:
    from zfalkon.client import query_status

    info = query_status(args.broker, timeout=args.timeout, keys=args.keys)
    runs = info.get("runs", [])
    if args.json:
        print(json.dumps({"runs": runs, "runs_omitted": info.get("runs_omitted", 0),
                          "hold_seconds": info.get("hold_seconds")}, indent=2))
    elif not runs:
        print("no runs on this broker (a run is a client session that has submitted tasks)")
    else:
        print("\n".join(format_runs(runs, info.get("runs_omitted", 0))))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from zfalkon.client import cancel_run, query_status

    run = args.run
    shown = P.short(run, 40)  # (never the whole of what was typed)
    # A number or a name (the run's label, or its client's name), never a guess: a name
    # must belong to one run of a complete list, a number that is also a name is refused.
    # A number is ASCII digits of a size a key can have ("\u00b2".isdigit() is True).
    number = int(run) if run.isascii() and run.isdigit() and len(run) <= 19 else None
    info = query_status(args.broker, timeout=args.timeout, keys=args.keys)
    runs, omitted = info.get("runs", []), info.get("runs_omitted", 0)
    named = [r for r in runs if run in (r["run"], r["name"])]
    if number is not None and not named:
        key, label = number, str(number)
    elif number is not None and any(r["id"] == number for r in runs):
        raise ConfigError(f"{shown} is both a run's number and a run's name: rename the "
                          "run, or cancel it by its number when no run is named so")
    elif omitted:
        raise ConfigError(f"the broker has more runs than it lists ({omitted} not listed): "
                          f"cancel by the number in the RUN column, not by name")
    elif not named:
        raise ConfigError(f"no run named {shown} on this broker (zfalkon runs lists "
                          "them; cancel by the number in its RUN column)")
    elif len(named) > 1:
        ids = [str(r["id"]) for r in named]
        listed = ", ".join(ids[:5]) + (f", ... ({len(ids) - 5} more)" if len(ids) > 5 else "")
        raise ConfigError(f"{len(named)} runs are named {shown} (runs {listed}): cancel "
                          "by number")
    else:
        key, label = named[0]["id"], f"{named[0]['id']} ({run[:40]})"
    queued, killing = cancel_run(key, args.broker, kill=not args.queued_only,
                                 timeout=args.timeout, keys=args.keys)
    print(f"cancelled run {label}: {queued} queued tasks removed" + (
        "" if args.queued_only else f", {killing} running or prefetched tasks being killed"))
    return 0


@contextlib.contextmanager
def _executor(broker: str | None, workers: int | None, keys: str | None,
              run: str | None = None) -> Iterator[Executor]:
    """An Executor on ``broker`` ($ZFALKON_BROKER), else on a LocalCluster of ``workers``;
    ``run``: its run label (``zfalkon runs``)."""
    broker = broker or (None if workers else os.environ.get(BROKER_ENV))
    if broker:
        with Executor(broker, keys=keys, run=run) as ex:
            yield ex
    else:
        with LocalCluster(workers=workers or os.cpu_count() or 1,
                          keep_workers=True) as cluster, \
                Executor(cluster.address, run=run) as ex:
            yield ex


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as KeyboardInterrupt is for SIGINT (exit status 143)."""


_SIGNAL_EXIT: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class _SignalStop:
    """SIGINT and SIGTERM during ``zfalkon run``: the first stops the run (a
    :class:`~zfalkon.runfile.Stop` on its event queue once tasks are submitted, else
    KeyboardInterrupt); a second exits at once."""

    def __init__(self, events: queue.SimpleQueue) -> None:
        self.events = events
        self.armed = False  # run_tasks reads the queue
        self.signum: int | None = None
        self._saved = {s: signal.signal(s, self._handle) for s in _SIGNAL_EXIT}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # the second: at once (every line written is flushed)
            os.write(2, b"\nzfalkon run: stopped at once; this run's tasks stay on the "
                        b"broker until its hold time cancels them (zfalkon cancel RUN "
                        b"does it now)\n")
            os._exit(_SIGNAL_EXIT[signum])
        self.signum = signum
        if self.armed:
            self.events.put(runfile.Stop(signal.Signals(signum).name, signum))
        else:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def restore(self) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)


def _open_new(path: str, force: bool, flag: str, binary: bool = False) -> IO:
    """Open ``path`` for writing; an existing file only with ``--force``."""
    mode = "w" if force else "x"
    try:
        return open(path, mode + "b") if binary else open(path, mode, encoding="utf-8")
    except FileExistsError:
        raise ConfigError(f"{path} exists: --force overwrites it" + (
            ", --resume continues the run it records" if flag == "-o" else "")) from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({flag}): {exc.strerror}") from None


def _check_run_options(args: argparse.Namespace) -> None:
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if args.retries < 0:
        raise ConfigError("--retries must be 0 or more")
    if args.wait_workers is not None and not args.wait_workers > 0:
        raise ConfigError("--wait-workers must be a positive number of seconds")
    if not args.worker_warning > 0:
        raise ConfigError("--worker-warning must be a positive number of seconds")
    if args.resume and not args.output:
        raise ConfigError("--resume needs -o FILE: the results file of the run to continue")
    if args.resume and args.force:
        raise ConfigError("--resume appends to -o FILE and --force overwrites it: choose one")
    if args.failed_to and os.path.lexists(args.failed_to) and not (args.force or args.resume):
        # (said now, not after the run: the rescue file is written last)
        raise ConfigError(f"{args.failed_to} exists: --force overwrites it (--failed-to; "
                          "with --resume it is rewritten for the run it continues)")


def _run(args: argparse.Namespace) -> int:
    _check_run_options(args)
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
        done: set = set()
        if args.resume and os.path.exists(args.output):
            try:
                done = runfile.read_done(args.output)
            except OSError as exc:
                raise ConfigError(f"cannot read {args.output} (-o): {exc.strerror}") from None
        summary = runfile.RunSummary()
        if args.resume:
            try:
                out: IO[str] = open(args.output, "a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot write {args.output} (-o): {exc.strerror}") from None
        else:
            out = _open_new(args.output, args.force, "-o") if args.output else sys.stdout
        try:
            status = _run_file(args, source, checked.tasks, done, out, summary)
        finally:
            if out is not sys.stdout:
                out.close()
        if args.failed_to and (status != 0 or summary.failed or
                               os.path.lexists(args.failed_to)):  # (a stale one: emptied)
            with _open_new(args.failed_to, args.force or args.resume, "--failed-to",
                           binary=True) as f:
                n = runfile.write_rescue(source, f, summary, done)
            print(f"zfalkon run: the {n} task lines that did not succeed are in "
                  f"{args.failed_to} (run it as a task file)", file=sys.stderr)
    return status


def _run_file(args: argparse.Namespace, source: BinaryIO, tasks: int, done: set,
              out: IO[str], summary: runfile.RunSummary) -> int:
    """Run the checked task file; the exit status (see README: The command line)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    stopper = _SignalStop(events)
    written_to = args.output or "standard output"
    try:
        label = args.name or ("stdin" if args.taskfile == "-" else
                              os.path.basename(args.taskfile))
        with _executor(args.broker, args.workers, args.keys, label) as ex:
            watch = _watch_run(ex, args, events, summary).start()
            stopper.armed = True
            try:
                runfile.run_tasks(ex, runfile.skip_done(runfile.iter_tasks(source), done,
                                                        summary),
                                  out, timeout=args.timeout, total=tasks - len(done),
                                  progress=sys.stderr.isatty(), summary=summary,
                                  retries=args.retries, events=events)
            finally:
                stopper.armed = False
                watch.stop()
    except runfile.Stopped as exc:
        print(_describe_stop(exc.stop, summary, tasks, written_to), file=sys.stderr)
        if exc.stop.signum is not None:
            return _SIGNAL_EXIT[exc.stop.signum]
        return runfile.EXIT_STOPPED
    except ZfalkonError as exc:
        if not summary.total:
            raise  # nothing submitted: the usual error and status
        summary.stopped = runfile.Stop(str(exc))  # (what did not run goes in --failed-to)
        print(f"zfalkon run: stopped after submitting {summary.total} of {tasks} "
              f"tasks: {exc}\nzfalkon run: the {summary.written} results received are "
              f"written to {written_to}", file=sys.stderr)
        return runfile.EXIT_STOPPED
    finally:
        stopper.restore()
    if not summary.ok or sys.stderr.isatty() or summary.skipped:
        print(runfile.describe_failures(summary), file=sys.stderr)
    return 0 if summary.ok else 1


def _watch_run(ex: Executor, args: argparse.Namespace, events: queue.SimpleQueue,
               summary: runfile.RunSummary) -> WorkerWatch:
    """Warn (and with --wait-workers stop the run) while the broker has no worker."""
    return WorkerWatch(
        ex.address, args.keys, warn_after=args.worker_warning, fail_after=args.wait_workers,
        on_warn=lambda m: events.put(runfile.Notice(f"zfalkon run: warning: {m}")),
        on_fail=lambda m: events.put(runfile.Stop(m)),
        progress=lambda: summary.written + summary.retried)


def _describe_stop(stop: runfile.Stop, summary: runfile.RunSummary, tasks: int,
                   written_to: str) -> str:
    """The summary printed when a run stops early: what ran, what did not, and why."""
    why = f"interrupted ({stop.reason})" if stop.signum is not None else f"stopped: {stop.reason}"
    to_run = tasks - summary.skipped
    not_run = to_run - summary.written
    unfinished = len(summary.unfinished_lines)
    running = summary.running_at_stop
    parts = [f"{unfinished - running} cancelled on the broker before any worker had them"]
    if running:
        parts.append(f"{running} were running: " + (
            "cancelled too" if summary.killed_running else
            "abandoned (they may finish on their workers; their results are dropped)"))
    parts.append(f"{to_run - summary.total} never submitted")
    again = ("run the same command with --resume (instead of --force) to run only what "
             "did not succeed" if written_to != "standard output" else
             "with -o FILE, --resume would run only what did not succeed")
    return (f"zfalkon run: {why}\n"
            f"zfalkon run: {summary.written} of {to_run} tasks finished "
            f"({summary.failed} failed); their results are written to {written_to}\n"
            f"zfalkon run: {not_run} tasks not run: {'; '.join(parts)}\n"
            f"zfalkon run: {again}")


def _bench(args: argparse.Namespace) -> int:
    from zfalkon.bench import format_table, run_bench

    figures = run_bench(args.broker, workers=args.workers, slots=args.slots, tasks=args.tasks,
                        kind=args.kind, task_seconds=args.task_seconds, repeat=args.repeat,
                        rtt_ms=args.rtt_ms, swarm=args.swarm, secure=args.secure,
                        progress=sys.stderr.isatty() and not args.json,
                        keys=args.keys, worker_warning=args.worker_warning,
                        wait_workers=args.wait_workers)
    print(json.dumps(figures) if args.json else format_table(figures))
    return 0 if figures["errors"] == 0 else 1


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that states every option's default (unless its text already does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (text and "default" not in text and action.option_strings and
                action.default is not None and action.default is not False and
                action.default not in ([], "", argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands' help states defaults too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


USAGE = """zfalkon runs many short tasks (shell commands, Python calls) on workers that
connect out to one broker.

  zfalkon run tasks.txt -o results.jsonl       run a task file (one command per line) on
                                               a local cluster, or on --broker ADDR
  zfalkon broker / zfalkon worker --broker ADDR    run the fabric yourself
  zfalkon status --broker ADDR [--watch]       what a broker has: workers, runs, counters
  zfalkon runs / zfalkon cancel RUN            list the runs on a broker / cancel one
  zfalkon keys init DIR                        CurveZMQ keys for a broker on a network
  zfalkon ec2 up ...                           a pool of EC2 workers that follows the queue

Set $ZFALKON_BROKER and $ZFALKON_KEYS once instead of --broker and --keys.
'zfalkon COMMAND --help' explains each command.
"""


STATUS_HELP = """Show what a broker has: its counters, one line per worker, one per run.

running counts tasks slots have started (a slot runs one task at a time); prefetched,
tasks slots hold ready to run next; queued, tasks no slot has yet. tasks/s is the rate
of finished tasks over the broker's last 10 one-second ticks. The status connection
itself is not counted as a client. --watch redraws the view until Ctrl-C.
"""

RUNS_HELP = """A run is one client session: one 'zfalkon run', or one Python Executor (named
with Executor(run=LABEL); 'zfalkon run --name LABEL'). The broker numbers it (the RUN
column; Executor.key) and counts its tasks: queued, running, prefetched, done, failed,
cancelled; CLIENT says whether its client is connected, or away and for how long.

'zfalkon cancel RUN' removes the run's queued tasks and kills its running and
prefetched ones (their futures and result lines end cancelled). With CurveZMQ keys
(broker --keys) only a client key of the same identity as the run's may cancel it;
without keys anyone who can reach the broker can, as anyone can submit.

A run whose client vanished without saying goodbye (killed, or its link lost) is kept
for the broker's --hold-seconds (300 s, with --journal 3600 s): its tasks run on and its
results wait for it; if it does not come back, its queued tasks are dropped and its
running ones killed.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zfalkon", description=USAGE)
    parser.add_argument("--version", action="version", version=f"zfalkon {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much the broker, worker and provisioner log")
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
    p.add_argument("--max-crashes", type=int, default=MAX_CRASHES, metavar="N",
                   help="a task running when its slot or worker agent died N times fails "
                        "with WorkerCrashed naming it (quarantined) instead of running on "
                        f"another worker (default {MAX_CRASHES}; 1: at the first crash)")
    p.add_argument("--hold-seconds", type=float, default=None, metavar="S",
                   help=f"how long a client that vanished without BYE (killed, link lost) "
                        f"may come back: its tasks run on and its results are kept; then "
                        f"its run is cancelled (queued tasks dropped, running ones killed) "
                        f"(default {CLIENT_AWAY_SECONDS:g} s, with --journal "
                        f"{CLIENT_HOLD_SECONDS:g} s)")
    p.set_defaults(func=_broker)

    p = sub.add_parser("keys", help="create, list and revoke CurveZMQ keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("init", help="create a broker key directory")
    k.add_argument("dir", help="the directory to create (0700)")
    k = keys.add_parser("new", help="create and authorize a worker or client key")
    k.add_argument("name", help="the key's name (letters, digits, . _ -)")
    k.add_argument("--role", choices=["worker", "client"], required=True,
                   help="worker: may register workers; client: may submit and ask status")
    k.add_argument("--dir", help=f"the broker's key directory (default ${KEY_DIR_ENV})")
    k.add_argument("--out", help="where to write the bundle (default DIR/issued/NAME)")
    k = keys.add_parser("list", help="list authorized and revoked keys")
    k.add_argument("--dir", help=f"the broker's key directory (default ${KEY_DIR_ENV})")
    k = keys.add_parser("revoke", help="take a key's authorization back (no restart needed)")
    k.add_argument("name", help="the key to revoke")
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
    p.add_argument("--sandbox", choices=["auto", "namespaces", "none"],
                   default=os.environ.get("ZFALKON_SANDBOX", "auto"),
                   help="run each client's task host in its own user, PID and mount "
                        "namespaces, so that a task cannot see or signal the worker's other "
                        "processes nor touch its state files. namespaces: refuse to start "
                        "where the kernel refuses them; auto (default): use them if a probe "
                        "at start succeeds, else warn once and run hosts as the worker's "
                        "Unix user, unsandboxed; none: never (default $ZFALKON_SANDBOX, "
                        "else auto; workers a provisioner starts take it from there too)")
    p.set_defaults(func=_worker)

    from zfalkon.provision.cli import add_parsers

    add_parsers(sub)

    p = sub.add_parser("vm-agent", help="run a worker on a cloud VM (started by systemd)")
    p.add_argument("--config", default="/etc/zfalkon/worker.json",
                   help="the worker configuration the cloud-config wrote")
    p.set_defaults(func=_vm_agent)

    p = sub.add_parser("status", help="show a broker's counters, workers and runs",
                       description=STATUS_HELP)
    p.add_argument("--broker", default=None, help=f"tcp://HOST:PORT (default ${BROKER_ENV})")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--watch", action="store_true",
                   help="show the status again every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between views with --watch")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for the broker's answer")
    p.add_argument("--keys", metavar="BUNDLE", help=f"client key bundle (default ${KEYS_ENV})")
    p.set_defaults(func=_status)

    p = sub.add_parser("runs", help="list the runs on a broker with their counters",
                       description=RUNS_HELP)
    p.add_argument("--broker", default=None, help=f"tcp://HOST:PORT (default ${BROKER_ENV})")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for the broker's answer")
    p.add_argument("--keys", metavar="BUNDLE", help=f"client key bundle (default ${KEYS_ENV})")
    p.set_defaults(func=_runs)

    p = sub.add_parser("cancel", help="cancel a run: drop its queued tasks, kill its "
                                      "running ones", description=RUNS_HELP)
    p.add_argument("run", help="the run: its number (RUN column of zfalkon runs) or its name")
    p.add_argument("--queued-only", action="store_true",
                   help="only drop its queued tasks; running and prefetched ones finish")
    p.add_argument("--broker", default=None, help=f"tcp://HOST:PORT (default ${BROKER_ENV})")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for the broker's answer")
    p.add_argument("--keys", metavar="BUNDLE", help=f"client key bundle (default ${KEYS_ENV})")
    p.set_defaults(func=_cancel)

    p = sub.add_parser("run", help="run a task file: one shell command per line",
                       description=runfile.RUN_HELP)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--broker", default=None,
                       help=f"tcp://HOST:PORT (default ${BROKER_ENV}, else a local cluster)")
    where.add_argument("--workers", type=int, default=None,
                       help="run on a local cluster of N workers (default: cores)")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="JSON lines file, one line per task written as it ends (default "
                        "standard output); an existing FILE is refused unless --force "
                        "or --resume")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing -o FILE (and --failed-to FILE)")
    p.add_argument("--resume", action="store_true",
                   help="append to -o FILE, skipping the tasks it records with exit status "
                        "0 (same line number and command)")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="run a task that fails (non-zero exit, timeout, error) again, up to "
                        "N times; only its last attempt is written")
    p.add_argument("--failed-to", metavar="FILE",
                   help="write the task lines that did not succeed (failed, or not run "
                        "after a stop) to FILE, a task file to run again")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds per task (default: none; a JSON line's own timeout wins)")
    p.add_argument("--worker-warning", type=float, default=NO_WORKER_WARNING_SECONDS,
                   metavar="S",
                   help="warn when the broker has had no worker for S seconds while "
                        "tasks wait")
    p.add_argument("--wait-workers", type=float, default=None, metavar="S",
                   help="stop the run (exit 4) when the broker has had no worker for S "
                        "seconds while tasks wait (default: wait, with the warning)")
    p.add_argument("--name", default=None, metavar="LABEL",
                   help="the run's name in zfalkon runs (default: the task file's name); "
                        "zfalkon cancel LABEL cancels it")
    p.add_argument("taskfile", help="task file, or - for standard input")
    p.add_argument("--keys", metavar="BUNDLE", help=f"client key bundle (default ${KEYS_ENV})")
    p.set_defaults(func=_run)

    p = sub.add_parser("bench", help="measure tasks per second")
    p.add_argument("--broker", default=None, help="tcp://HOST:PORT (default: a local cluster)")
    p.add_argument("--keys", metavar="BUNDLE",
                   help=f"client key bundle for --broker (default ${KEYS_ENV})")
    p.add_argument("--workers", type=int, default=2,
                   help="local cluster workers, at least 1 (default 2)")
    p.add_argument("--slots", type=int, default=1, help="slots per local worker (default 1)")
    p.add_argument("--tasks", type=int, default=200_000, help="tasks per run (default 200000)")
    p.add_argument("--kind", choices=["noop", "sleep", "shell"], default="noop",
                   help="noop: Python no-ops through map; sleep: time.sleep tasks; shell: "
                        "shell commands")
    p.add_argument("--task-seconds", type=float, default=0.0,
                   help="task length for sleep and shell kinds")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs; figures are their medians")
    p.add_argument("--rtt-ms", type=float, default=0.0,
                   help="put the workers behind an emulated link of this round trip")
    p.add_argument("--swarm", type=int, default=0, metavar="N",
                   help="N simulated workers (sleep tasks without processes) instead of real ones")
    p.add_argument("--secure", action="store_true",
                   help="local cluster with CurveZMQ keys (measures encryption's cost)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--worker-warning", type=float, default=NO_WORKER_WARNING_SECONDS,
                   metavar="S", help="with --broker: warn when it has had no worker for S "
                                     "seconds")
    p.add_argument("--wait-workers", type=float, default=None, metavar="S",
                   help="with --broker: fail when it has had no worker for S seconds "
                        "(default: wait, with the warning)")
    p.set_defaults(func=_bench)
    return parser


def _cli_words(exc: ZfalkonError, args: argparse.Namespace) -> str:
    """An error as the command line says it: a broker that did not answer is probed to
    tell a refused connection from a refused key, in terms of flags, not parameters."""
    text = str(exc)
    if isinstance(exc, BrokerUnavailable) and text.startswith("no answer from a zfalkon"):
        broker = getattr(args, "broker", None) or os.environ.get(BROKER_ENV)
        if broker:
            try:
                return (text.split(" (", 1)[0] + ": " +
                        explain_no_answer(broker, getattr(args, "keys", None)))
            except ZfalkonError:
                pass
    if text.startswith("no broker address: pass one or set"):
        return f"no broker address: pass --broker tcp://HOST:PORT or set ${BROKER_ENV}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zfalkon`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s zfalkon-{args.command} %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ZfalkonError as exc:
        print(f"zfalkon {args.command}: {_cli_words(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return 143 if isinstance(exc, Terminated) else 130
