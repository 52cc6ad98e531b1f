"""Snakemake's own executor-plugin test base (``snakemake.common.tests``, as the
cluster-generic plugin's tests use it) with the zfalkon executor, against a LocalCluster
of 2 workers x 2 slots on 127.0.0.1 (shared file system: the same machine)."""

import os
from typing import Optional

import pytest
import snakemake.common.tests
from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

from snakemake_executor_plugin_zfalkon import ExecutorSettings
from zfalkon import LocalCluster


@pytest.fixture(scope="session", autouse=True)
def cluster():
    with LocalCluster(workers=2, slots_per_worker=2) as c:
        os.environ["ZFALKON_TEST_BROKER"] = c.address
        yield c


class TestWorkflows(snakemake.common.tests.TestWorkflowsLocalStorageBase):
    __test__ = True

    def get_executor(self) -> str:
        return "zfalkon"

    def get_executor_settings(self) -> Optional[ExecutorSettingsBase]:
        return ExecutorSettings(broker=os.environ["ZFALKON_TEST_BROKER"])


class TestFailingJob:
    """A job whose command fails is reported failed, with the end of its output."""

    def test_failing_job_fails_the_workflow(self, tmp_path, capfd):
        from snakemake import api
        from snakemake.settings import types as settings

        (tmp_path / "Snakefile").write_text(
            'rule bad:\n    output: "x.txt"\n    shell: "echo kaputt-42 >&2; exit 3"\n')
        with pytest.raises(Exception):
            with api.SnakemakeApi(settings.OutputSettings(verbose=True)) as snakemake_api:
                workflow_api = snakemake_api.workflow(
                    resource_settings=settings.ResourceSettings(cores=1, nodes=2),
                    storage_settings=settings.StorageSettings(),
                    workdir=tmp_path, snakefile=tmp_path / "Snakefile")
                workflow_api.dag().execute_workflow(
                    executor="zfalkon",
                    executor_settings=ExecutorSettings(
                        broker=os.environ["ZFALKON_TEST_BROKER"]),
                    execution_settings=settings.ExecutionSettings(latency_wait=1),
                    remote_execution_settings=settings.RemoteExecutionSettings(
                        seconds_between_status_checks=0))
        err = capfd.readouterr().err
        assert "exited with status 1" in err or "exited with status 3" in err, err[-3000:]
        assert "kaputt-42" in err
        assert not (tmp_path / "x.txt").exists()
