"""A Parsl config for Parsl's own test suite on zfalkon (``pytest --pyargs parsl.tests
--config tests/parsl_config.py``): one local block, a zfalkon worker with one slot per
core, like Parsl's ``htex_local`` config with ``cores_per_worker=1``."""

from parsl.config import Config
from parsl.launchers import SimpleLauncher
from parsl.providers import LocalProvider

from zfalkon.parsl import ZfalkonExecutor


def fresh_config():
    return Config(
        executors=[
            ZfalkonExecutor(
                label="zfalkon_local",
                provider=LocalProvider(init_blocks=1, max_blocks=1, launcher=SimpleLauncher()),
            )
        ],
        strategy="none",
    )
