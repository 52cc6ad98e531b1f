"""EC2 provisioner: instances launched with boto3, tagged with their pool, user-data from
:mod:`zfalkon.provision.userdata`.

Every instance carries the tag ``zfalkon-pool=POOL`` and is launched with
``InstanceInitiatedShutdownBehavior=terminate`` (a VM that powers itself off stops
costing money); :meth:`EC2Provisioner.sweep` terminates everything with the tag.
"""

from __future__ import annotations

from typing import Any, Sequence

from zfalkon.errors import ConfigError
from zfalkon.provision.base import Instance, ProvisionError

POOL_TAG = "zfalkon-pool"
LIVE_STATES = ("pending", "running")


def ec2_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A boto3 EC2 client with standard retries and the usual credential chain
    (environment, profile, instance profile)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("EC2 needs boto3: pip install 'zfalkon[aws]'") from None
    return boto3.client("ec2", region_name=region, endpoint_url=endpoint_url,
                        config=Config(retries={"max_attempts": 8, "mode": "standard"}))


class EC2Provisioner:
    """Launch, list and terminate one pool's instances.

    Listing, terminating and sweeping need only ``pool`` and ``client``; :meth:`launch`
    needs ``ami`` and ``user_data`` too.
    """

    def __init__(self, pool: str, client: Any, *, ami: str | None = None,
                 instance_type: str = "t3.small", user_data: str | None = None,
                 subnet: str | None = None, security_groups: Sequence[str] = (),
                 instance_profile: str | None = None, key_name: str | None = None,
                 spot: bool = False) -> None:
        self.pool = pool
        self.client = client
        self.instance_type = instance_type
        self._launch: dict[str, Any] | None = None
        if ami and user_data is not None:
            tags = [{"Key": POOL_TAG, "Value": pool},
                    {"Key": "Name", "Value": f"zfalkon-worker-{pool}"}]
            args: dict[str, Any] = dict(
                ImageId=ami, InstanceType=instance_type, UserData=user_data,
                InstanceInitiatedShutdownBehavior="terminate",
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
            if subnet:
                args["SubnetId"] = subnet
            if security_groups:
                args["SecurityGroupIds"] = list(security_groups)
            if instance_profile:
                args["IamInstanceProfile"] = {"Name": instance_profile}
            if key_name:
                args["KeyName"] = key_name
            if spot:
                args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                    "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
            self._launch = args

    def launch(self, n: int) -> list[Instance]:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._launch is None:
            raise ConfigError(f"pool {self.pool}: launching needs an AMI and user-data")
        try:
            reply = self.client.run_instances(MinCount=1, MaxCount=n, **self._launch)
        except (ClientError, BotoCoreError) as exc:
            raise ProvisionError(f"launching {n} x {self.instance_type} "
                                 f"({self._launch['ImageId']}): {exc}") from None
        return [self._instance(i) for i in reply["Instances"]]

    def instances(self, states: Sequence[str] = LIVE_STATES) -> list[Instance]:
        filters = [{"Name": f"tag:{POOL_TAG}", "Values": [self.pool]},
                   {"Name": "instance-state-name", "Values": list(states)}]
        return [self._instance(i) for i in _described(self.client, filters)]

    def terminate(self, ids: list[str]) -> None:
        if ids:
            self.client.terminate_instances(InstanceIds=list(ids))

    def sweep(self) -> list[str]:
        """Terminate every instance of the pool that is not already gone."""
        ids = [i.id for i in self.instances(("pending", "running", "stopping", "stopped"))]
        self.terminate(ids)
        return ids

    @staticmethod
    def _instance(raw: dict) -> Instance:
        # The worker names itself after the instance id (vm-agent, from the metadata).
        return Instance(raw["InstanceId"], raw["State"]["Name"], raw["InstanceId"],
                        raw["LaunchTime"].timestamp())


def _described(client: Any, filters: list[dict]) -> list[dict]:
    out = []
    for page in client.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            out += reservation["Instances"]
    return out


def sweep_all(client: Any) -> list[str]:
    """Terminate every zfalkon-tagged instance in the region, whatever its pool."""
    filters = [{"Name": "tag-key", "Values": [POOL_TAG]},
               {"Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"]}]
    ids = [i["InstanceId"] for i in _described(client, filters)]
    if ids:
        client.terminate_instances(InstanceIds=ids)
    return ids
