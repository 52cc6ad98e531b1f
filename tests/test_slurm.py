"""A real batch system: a single-node Slurm on loopback, and a Parsl workflow whose zfalkon
workers were launched by Parsl's ``SlurmProvider`` as Slurm jobs (``tox -e slurm``).

The test starts its own ``munged`` (with its own key), ``slurmctld`` and ``slurmd`` in the
foreground, from a ``slurm.conf`` it writes for this host (loopback addresses, free ports,
state and spool in a temporary directory, no accounting, no cgroups), and stops each by PID.
It needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/install-slurm``) and root (``slurmd``
launches jobs); without the binaries the module is skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

from conftest import free_port, stop_process

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol",
             "scancel", "srun")
_FOUND = {name: shutil.which(name, path=_SEARCH_PATH) for name in _BINARIES}
if not _FOUND["slurmctld"] or not _FOUND["slurmd"]:
    pytest.skip("Slurm is not installed (no slurmctld/slurmd): `tox -e slurm` needs Debian's "
                "slurm-wlm and munge (.ci/install-slurm)", allow_module_level=True)

parsl = pytest.importorskip("parsl")

from parsl.config import Config  # noqa: E402
from parsl.launchers import SrunLauncher  # noqa: E402
from parsl.providers import SlurmProvider  # noqa: E402

from zfalkon.parsl import ZfalkonExecutor  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["zfalkon"].__file__)))

#: Seconds for the daemons to come up, for the block to start a worker, for the apps.
DAEMONS_TIMEOUT = 60.0
WORKER_TIMEOUT = 60.0
APPS_TIMEOUT = 60.0


def _bin(name: str) -> str:
    path = _FOUND[name]
    if path is None:
        raise AssertionError(f"{name} not found (install slurm-wlm and munge: .ci/install-slurm)")
    return path


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def _node_hardware() -> str:
    """The node line's CPU layout as ``slurmd -C`` sees this machine (so slurmd registers
    with what slurm.conf says and the node does not drain); ``CPUs=os.cpu_count()`` if not."""
    out = subprocess.run([_bin("slurmd"), "-C"], capture_output=True, text=True,
                         timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("NodeName="):
            keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            return " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return f"CPUs={os.cpu_count() or 1}"


class SlurmCluster:
    """munged, slurmctld and slurmd for one node, on 127.0.0.1, in a temporary directory."""

    def __init__(self) -> None:
        # munged wants every directory above its socket searchable by all (pytest's
        # tmp_path is under a 0700 directory): a directory of our own in /tmp, 0711.
        self.base = tempfile.mkdtemp(prefix="zfalkon-slurm-")
        os.chmod(self.base, 0o711)
        self.node = socket.gethostname().split(".")[0]  # `hostname -s`, as slurmd names itself
        self.conf = os.path.join(self.base, "slurm.conf")
        self.munge_socket = os.path.join(self.base, "munge", "munge.socket")
        # each daemon runs in the foreground and logs to its stderr, kept here
        self.logs = {n: os.path.join(self.base, "log", f"{n}.out")
                     for n in ("munged", "slurmctld", "slurmd")}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.loopback_only = False

    # -- set-up -----------------------------------------------------------------------------

    def start(self) -> None:
        for d, mode in (("munge-key", 0o700), ("munge", 0o755), ("state", 0o700),
                        ("spool", 0o700), ("log", 0o755)):
            os.mkdir(os.path.join(self.base, d), mode)
        self._start_munged()
        self._write_conf()
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-f", self.conf])
        self._spawn("slurmd", [_bin("slurmd"), "-D", "-f", self.conf, "-N", self.node])
        self._wait("the node to be idle in sinfo", lambda: self.node_state() == "idle")
        if self.loopback_only:
            for name in ("slurmctld", "slurmd"):
                assert self.listening(name) == {"127.0.0.1"}, (name, self.listening(name))

    def _start_munged(self) -> None:
        key = os.path.join(self.base, "munge-key", "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(128))
        run = os.path.join(self.base, "munge")
        self._spawn("munged", [_bin("munged"), "--foreground", f"--key-file={key}",
                               f"--socket={self.munge_socket}",
                               f"--pid-file={run}/munged.pid", f"--seed-file={run}/munged.seed"])
        self._wait("munged's socket", lambda: os.path.exists(self.munge_socket))

    def _write_conf(self) -> None:
        user = pwd.getpwuid(os.getuid()).pw_name
        ctld_port = free_port()
        slurmd_port = free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        b = self.base
        text = f"""\
# A single-node Slurm for tests/test_slurm.py: loopback only, nothing outside {b}
ClusterName=zfalkon
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
{self._bind_parameters()}NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def _bind_parameters(self) -> str:
        """Slurm's daemons, and srun, listen on every address unless told to bind to the
        one their host name resolves to: told so when that is 127.0.0.1 (as in the usual
        /etc/hosts of a container), which makes every Slurm socket a loopback one. Where the
        name resolves elsewhere, srun would listen there while the step daemon calls it
        back on 127.0.0.1, so the default stays (all configured addresses are loopback)."""
        try:
            self.loopback_only = socket.gethostbyname(self.node) == "127.0.0.1"
        except OSError:
            self.loopback_only = False
        return "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny\n" if self.loopback_only else ""

    def listening(self, name: str) -> set[str]:
        """The addresses the daemon ``name`` listens on."""
        import psutil

        conns = psutil.Process(self.procs[name].pid).net_connections(kind="inet")
        return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs[name], "wb")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=self.env)
        finally:
            out.close()

    def _wait(self, what: str, predicate, timeout: float = DAEMONS_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}) while waiting "
                                         f"for {what}\n{self.diagnostics()}")
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {what} within {timeout:g} s\n{self.diagnostics()}")
            time.sleep(0.1)  # (poll interval: the condition is the predicate)

    # -- observation -------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([_bin(cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              env=self.env, timeout=30, check=check)

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T").stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (empty if Slurm no longer knows the job)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def diagnostics(self) -> str:
        parts = [f"--- {self.conf}\n{_tail(self.conf, 60)}"]
        for name in ("munged", "slurmctld", "slurmd"):
            parts.append(f"--- {name} ({self.logs[name]})\n{_tail(self.logs[name])}")
        return "\n".join(parts)

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel any job still on this cluster (a failed test's), then stop the daemons by
        PID, slurmd first, munged last; remove the directory."""
        try:
            self._cancel_leftover_jobs()
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.get(name)
                if proc is not None:
                    stop_process(proc, timeout=15.0)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _cancel_leftover_jobs(self, timeout: float = 30.0) -> None:
        """Jobs outlive slurmd (their step daemons are not its children): cancel what this
        private cluster still runs and wait until Slurm has ended it (KillWait=5)."""
        ctld = self.procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None or "slurmd" not in self.procs:
            return
        jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").stdout.split():
            if time.monotonic() >= deadline:
                print(f"jobs {jobs} still on Slurm {timeout:g} s after scancel", file=sys.stderr)
                return
            time.sleep(0.2)  # (poll interval: the condition is an empty squeue)


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster()
    saved = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        # Parsl's SlurmProvider runs sbatch/sacct/squeue/scancel with this process's
        # environment: they find this cluster through SLURM_CONF.
        os.environ["SLURM_CONF"] = cluster.conf
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        cluster.stop()


def _worker_init() -> str:
    """Shell lines the batch script runs before the worker: this test's Python (its
    ``zfalkon`` and Parsl) first on PATH; the directory this process imported zfalkon from
    (a source tree, or the env's site-packages under tox) and tests/ on PYTHONPATH."""
    bindir = os.path.dirname(sys.executable)
    pythonpath = os.pathsep.join([SOURCE_ROOT, TESTS_DIR])
    # (no task host sandbox: the test reads the apps' ancestry up to slurmstepd and their
    # PIDs, which a host's own PID namespace hides)
    return (f"export PATH={bindir}:$PATH\nexport PYTHONPATH={pythonpath}"
            "${PYTHONPATH:+:$PYTHONPATH}\nexport ZFALKON_SANDBOX=none")


def slurm_config(run_dir: str) -> Config:
    provider = SlurmProvider(
        partition="debug",
        nodes_per_block=1,
        init_blocks=1,
        min_blocks=0,
        max_blocks=1,
        walltime="00:10:00",
        worker_init=_worker_init(),
        launcher=SrunLauncher(),
        cmd_timeout=30,
    )
    executor = ZfalkonExecutor(label="zfalkon_slurm", provider=provider)
    # strategy "none" still submits the init_blocks, at the strategy's first pass
    return Config(executors=[executor], strategy="none", strategy_period=1, run_dir=run_dir)


@parsl.python_app
def where(i):
    """Where the app ran: its Slurm job (from the environment Slurm gave the job step) and
    the names of the processes above it."""
    import os

    import psutil

    me = psutil.Process()
    return {"square": i * i, "job": os.environ.get("SLURM_JOB_ID"),
            "step": os.environ.get("SLURM_STEP_ID"), "pid": me.pid,
            "ancestors": [p.name() for p in me.parents()]}


@parsl.bash_app
def job_id_to_file(stdout=None):
    return 'echo "job=$SLURM_JOB_ID step=$SLURM_STEP_ID"'


def _block_job(slurm: SlurmCluster, executor: ZfalkonExecutor) -> str:
    """The Slurm job of the one block (Parsl's strategy submits the ``init_blocks`` at its
    first pass, ``strategy_period`` after the load)."""
    deadline = time.monotonic() + WORKER_TIMEOUT
    while not executor.provider.resources:
        if executor.bad_state_is_set or time.monotonic() >= deadline:
            raise AssertionError(f"Parsl submitted no block to Slurm within {WORKER_TIMEOUT:g} s"
                                 f" ({executor.executor_exception!r})\n{slurm.diagnostics()}")
        time.sleep(0.1)  # (poll interval: the condition is a block submitted)
    jobs = list(executor.provider.resources)
    assert len(jobs) == 1, f"expected one Slurm job for the one block, got {jobs}"
    return jobs[0]


def _wait_for_worker(slurm: SlurmCluster, executor: ZfalkonExecutor, job_id: str) -> None:
    """Until the block's zfalkon worker has registered with the broker; fail early, with
    the job's own output, if the job ended or never started."""
    resource = executor.provider.resources[job_id]
    deadline = time.monotonic() + WORKER_TIMEOUT
    while True:
        if executor.executor.status(timeout=5.0).get("slots", 0) >= 1:
            return
        state = slurm.job(job_id).get("JobState", "(gone)")
        ended = state not in ("PENDING", "CONFIGURING", "RUNNING")
        if ended or time.monotonic() >= deadline:
            why = f"ended in state {state}" if ended else f"still {state} after {WORKER_TIMEOUT:g} s"
            raise AssertionError(
                f"the Slurm job {job_id} started no zfalkon worker: it {why}\n"
                f"--- job stdout {resource['job_stdout_path']}\n"
                f"{_tail(resource['job_stdout_path'])}\n"
                f"--- job stderr {resource['job_stderr_path']}\n"
                f"{_tail(resource['job_stderr_path'])}\n{slurm.diagnostics()}")
        time.sleep(0.2)  # (poll interval: the condition is a slot registered)


@pytest.mark.timeout(300)
def test_parsl_workflow_on_slurm_jobs(slurm, tmp_path):
    dfk = parsl.load(slurm_config(str(tmp_path / "runinfo")))
    executor = dfk.executors["zfalkon_slurm"]
    task_pids: list[int] = []
    job_id = None
    try:
        job_id = _block_job(slurm, executor)
        _wait_for_worker(slurm, executor, job_id)
        job = slurm.job(job_id)
        assert job.get("JobState") == "RUNNING" and job.get("JobName", "").startswith("parsl."), job

        futures = [where(i) for i in range(50)]
        out = tmp_path / "bash.out"
        bash = job_id_to_file(stdout=str(out))
        results = [f.result(timeout=APPS_TIMEOUT) for f in futures]
        assert bash.result(timeout=APPS_TIMEOUT) == 0

        assert [r["square"] for r in results] == [i * i for i in range(50)]
        # Every app ran inside the block's Slurm job, in the srun step the launcher made,
        # under Slurm's step daemon: the worker was launched by Slurm, not beside it.
        assert {r["job"] for r in results} == {job_id}
        assert {r["step"] for r in results} == {"0"}
        for r in results:
            assert "slurmstepd" in r["ancestors"], r["ancestors"]
        assert out.read_text().strip() == f"job={job_id} step=0"
        task_pids = sorted({r["pid"] for r in results})
    finally:
        dfk.cleanup()
        parsl.clear()

    # Parsl's shutdown cancelled the block: the job ends, and its processes with it.
    if job_id is not None:
        deadline = time.monotonic() + 60
        while slurm.job(job_id).get("JobState", "(gone)") in ("RUNNING", "COMPLETING"):
            assert time.monotonic() < deadline, f"job {job_id} still running after shutdown"
            time.sleep(0.2)  # (poll interval: the condition is the job's end)
        for pid in task_pids:
            while _alive(pid):
                assert time.monotonic() < deadline, f"task process {pid} outlived its job"
                time.sleep(0.2)  # (poll interval: the condition is the process gone)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
