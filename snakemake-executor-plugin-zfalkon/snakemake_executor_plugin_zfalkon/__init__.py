"""Snakemake executor plugin: each job of a workflow is one zfalkon shell task.

``snakemake --executor zfalkon --zfalkon-broker tcp://HOST:PORT -j N`` submits every job
(its ``python -m snakemake --target-jobs ...`` command, as for any remote executor) to a
zfalkon broker with ``Executor.shell``; the broker's workers run them. Snakemake learns
of a job's end as soon as its task's result arrives (no status polling: the futures wake
the status loop).

Assumptions, as with the cluster-generic plugin: by default the workers share the
workflow's file system (the job runs ``cd WORKDIR`` first) and its software (the same
Python with Snakemake installed, at the same path). Without a shared file system
(``--shared-fs-usage none``), use a default storage provider
(``--default-storage-provider s3 ...``): each job then runs in its task's own fresh
directory and Snakemake stages its files through the storage.

A job is one task on one slot whatever its ``threads``: size the workers' slots
(``zfalkon worker --slots``) for the jobs. Cancelling (Ctrl-C) cancels the jobs no worker
has started and kills the running ones on their workers (``Executor.cancel_all``).
"""

import asyncio
import os
import shlex
import threading
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import AsyncGenerator, List, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import (
    CommonSettings,
    ExecutorSettingsBase,
)

import zfalkon

STDERR_TAIL_LINES = 40  # of a failed job's output, in Snakemake's error message
SAFETY_WAKE_SECONDS = 5.0  # the status loop looks at least this often


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    broker: Optional[str] = field(
        default=None,
        metadata={
            "help": "The zfalkon broker, tcp://HOST:PORT (default: $ZFALKON_BROKER).",
            "env_var": False,
            "required": False,
        },
    )
    keys: Optional[str] = field(
        default=None,
        metadata={
            "help": "A zfalkon client key bundle, for a broker started with --keys "
            "(default: $ZFALKON_KEYS).",
            "env_var": False,
            "required": False,
        },
    )
    connect_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds to wait for the broker's answer.", "required": False},
    )


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=True,
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=0,
)


class Executor(RemoteExecutor):
    def __init__(self, workflow, logger) -> None:
        # (before the base class starts the status thread, which uses it at once)
        self._woken = threading.Event()  # set when a job's task completes
        super().__init__(workflow, logger)

    def __post_init__(self) -> None:
        settings = self.workflow.executor_settings
        try:
            self.zf = zfalkon.Executor(
                settings.broker,
                keys=settings.keys,
                connect_timeout=settings.connect_timeout,
                name=f"snakemake-{os.uname().nodename}-{os.getpid()}",
            )
        except zfalkon.ZfalkonError as exc:
            raise WorkflowError(f"zfalkon executor: {exc}") from exc

    # -- submitting ----------------------------------------------------------------------

    def get_job_exec_prefix(self, job: JobExecutorInterface) -> str:
        if self.workflow.storage_settings.assume_common_workdir:
            return f"cd {shlex.quote(self.workflow.workdir_init)}"
        return ""

    def run_job(self, job: JobExecutorInterface) -> None:
        command = self.format_job_exec(job)
        self.logger.debug(f"zfalkon task for job {job.jobid}: {command}")
        try:
            future = self.zf.shell(command)
        except zfalkon.ZfalkonError as exc:
            self.report_job_error(SubmittedJobInfo(job), msg=f"zfalkon: {exc}")
            return
        future.add_done_callback(lambda _f: self._woken.set())
        self.report_job_submission(
            SubmittedJobInfo(job, external_jobid=f"zfalkon-{future.task_id}",
                             aux={"future": future}))

    # -- status --------------------------------------------------------------------------

    async def check_active_jobs(
        self, active_jobs: List[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        self._woken.clear()  # (a task completing from here on wakes the next sleep)
        for info in active_jobs:
            future = info.aux["future"]
            if not future.done():
                yield info
                continue
            try:
                result = future.result()
            except CancelledError:
                self.report_job_error(info, msg="zfalkon: the job's task was cancelled. ")
                continue
            except Exception as exc:  # WorkerCrashed, WorkerLost, BrokerUnavailable, ...
                self.report_job_error(info, msg=f"zfalkon: {type(exc).__name__}: {exc}. ")
                continue
            if result.returncode == 0:
                self.logger.debug(f"job {info.job.jobid} done on {result.worker}")
                self.report_job_success(info)
            else:
                self.report_job_error(info, msg=_failure(result))

    async def sleep(self) -> None:
        """Until a job's task completes (or a few seconds pass), not a fixed interval:
        the futures say when to look."""
        if not self._woken.is_set():
            await asyncio.get_running_loop().run_in_executor(
                None, self._woken.wait, SAFETY_WAKE_SECONDS)

    # -- stopping ------------------------------------------------------------------------

    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]) -> None:
        # One CANCEL for every job: queued ones never run, running ones are killed on
        # their workers (their process groups).
        self.zf.cancel_all()
        self.zf.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self.lock:
            self.wait = False
        self._woken.set()  # (so the status loop sees it now)
        super().shutdown()
        self.zf.shutdown(wait=False, cancel_futures=True)


def _failure(result: zfalkon.ShellResult) -> str:
    """Snakemake's error message for a job whose command failed."""
    tail = "\n".join((result.stderr or result.stdout).splitlines()[-STDERR_TAIL_LINES:])
    return (f"zfalkon: the job exited with status {result.returncode} on worker "
            f"{result.worker}; the end of its output:\n{tail}\n")
