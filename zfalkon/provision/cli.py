"""``zfalkon ec2 up|status|down|sweep`` and ``zfalkon provision local``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from zfalkon.errors import ConfigError
from zfalkon.provision.policy import Policy, Scaler
from zfalkon.provision.run import run_scaler

log = logging.getLogger("zfalkon.provision")


def add_policy_options(p: argparse.ArgumentParser) -> None:
    d = Policy()
    p.add_argument("--broker", required=True, help="tcp://HOST:PORT the scaler asks for status")
    p.add_argument("--keys", help="client key bundle for the status queries ($ZFALKON_KEYS)")
    p.add_argument("--min", type=int, default=d.min_instances, dest="min_instances",
                   help="instances kept even when idle")
    p.add_argument("--max", type=int, default=d.max_instances, dest="max_instances",
                   help="most instances at once")
    p.add_argument("--step", type=int, default=d.step, help="most launches per decision")
    p.add_argument("--launches-per-minute", type=int, default=d.max_launches_per_minute,
                   help="most launches in any minute")
    p.add_argument("--slots-per-instance", type=int, default=d.slots_per_instance,
                   help="slots each instance brings (for the scaling arithmetic)")
    p.add_argument("--boot-deadline", type=float, default=d.boot_deadline,
                   help="seconds a new instance has to register")
    p.add_argument("--idle-seconds", type=float, default=d.idle_seconds,
                   help="scale in a worker idle this long")
    p.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="pause scale-out after this many consecutive failures")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between decisions")


def _policy(args: argparse.Namespace) -> Policy:
    return Policy(min_instances=args.min_instances, max_instances=args.max_instances,
                  slots_per_instance=args.slots_per_instance, step=args.step,
                  max_launches_per_minute=args.launches_per_minute,
                  boot_deadline=args.boot_deadline, idle_seconds=args.idle_seconds,
                  max_failures=args.max_failures)


def _serve(scaler: Scaler, args: argparse.Namespace) -> None:
    """Run the scaler until SIGTERM/SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("scaling pool %s: %s", scaler.provisioner.pool, scaler.policy)
    run_scaler(scaler, args.broker, keys=args.keys, interval=args.interval, stop=stop)


def ec2_command(args: argparse.Namespace) -> int:
    """``zfalkon ec2 ...``; missing AWS settings are one ConfigError line, no traceback."""
    try:
        import botocore.exceptions as bx
    except ImportError:
        return _ec2_command(args)  # (ec2_client says what to install)
    try:
        return _ec2_command(args)
    except bx.NoRegionError:
        raise ConfigError("no AWS region: pass --region REGION or set $AWS_REGION (or "
                          "$AWS_DEFAULT_REGION, or region= in ~/.aws/config)") from None
    except (bx.NoCredentialsError, bx.PartialCredentialsError):
        raise ConfigError("no AWS credentials: set $AWS_ACCESS_KEY_ID and "
                          "$AWS_SECRET_ACCESS_KEY, or $AWS_PROFILE, or run on an instance "
                          "with an instance profile") from None
    except bx.ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") in ("AuthFailure", "UnauthorizedOperation",
                                 "InvalidClientTokenId", "SignatureDoesNotMatch"):
            raise ConfigError(f"AWS refused the credentials: {error.get('Code')}: "
                              f"{error.get('Message', '')}") from None
        raise ConfigError(f"EC2: {exc}") from None
    except bx.EndpointConnectionError as exc:
        raise ConfigError(f"cannot reach EC2: {exc} (--region, --endpoint-url)") from None


def _ec2_command(args: argparse.Namespace) -> int:
    from zfalkon.provision.ec2 import EC2Provisioner, ec2_client, sweep_all

    client = ec2_client(args.region, args.endpoint_url)
    if args.ec2_command == "sweep" and not args.pool:
        ids = sweep_all(client)
        print(f"terminated {len(ids)} zfalkon instances: {' '.join(ids)}")
        return 0
    if args.ec2_command == "up":
        from zfalkon.provision.userdata import render

        user_data = render(args.worker_broker or args.broker, pool=args.pool,
                           keys=args.worker_keys, slots=args.slots,
                           idle_seconds=args.vm_idle_seconds,
                           register_deadline=args.boot_deadline, wheel_url=args.wheel_url)
        client.describe_instances(MaxResults=5)  # no region or credentials: say so now
        prov = EC2Provisioner(args.pool, client, ami=args.ami,
                              instance_type=args.instance_type, user_data=user_data,
                              subnet=args.subnet, security_groups=args.security_group,
                              instance_profile=args.instance_profile,
                              key_name=args.key_name, spot=args.spot)
        try:
            _serve(Scaler(prov, _policy(args)), args)
        finally:
            if not args.keep:
                ids = prov.sweep()
                print(f"pool {args.pool}: terminated {len(ids)} instances (--keep keeps them)")
        return 0
    prov = EC2Provisioner(args.pool, client)
    if args.ec2_command == "status":
        states = ("pending", "running", "stopping", "stopped", "shutting-down")
        for inst in prov.instances(states):
            print(f"{inst.id}  {inst.state}")
        return 0
    ids = prov.sweep()  # down, or sweep --pool
    print(f"pool {args.pool}: terminated {len(ids)} instances {' '.join(ids)}")
    return 0


def provision_local(args: argparse.Namespace) -> int:
    from zfalkon.provision.local import LocalProvisioner

    extra = ["--keys", args.worker_keys] if args.worker_keys else []
    prov = LocalProvisioner(args.broker, args.pool, slots=args.slots_per_instance,
                            worker_args=extra)
    try:
        _serve(Scaler(prov, _policy(args)), args)
    finally:
        prov.close()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ec2", help="workers on EC2 instances that follow the queue")
    ec2 = p.add_subparsers(dest="ec2_command", required=True)
    for name, text in [("up", "scale a pool with the broker's queue until stopped"),
                       ("status", "list the pool's instances"),
                       ("down", "terminate every instance of the pool"),
                       ("sweep", "terminate every zfalkon instance (of --pool, or all)")]:
        q = ec2.add_parser(name, help=text)
        q.add_argument("--pool", required=name != "sweep", help="pool id (a tag on each VM)")
        q.add_argument("--region", default=None,
                       help="AWS region (default $AWS_REGION or $AWS_DEFAULT_REGION, or the profile's)")
        q.add_argument("--endpoint-url", default=None, help="EC2 endpoint (e.g. a moto server)")
        if name == "up":
            add_policy_options(q)
            q.add_argument("--worker-broker", help="address the VMs connect to (default --broker)")
            q.add_argument("--worker-keys", help="worker key bundle, sent in the user-data")
            q.add_argument("--ami", required=True, help="image id (ami/ bakes one)")
            q.add_argument("--instance-type", default="t3.small", help="EC2 instance type")
            q.add_argument("--slots", type=int, default=0, help="slots per VM (0: cores)")
            q.add_argument("--subnet", help="subnet id (default: the default VPC's)")
            q.add_argument("--security-group", action="append", default=[],
                           help="security group id (repeatable; outbound access to the broker)")
            q.add_argument("--instance-profile", help="IAM instance profile name (e.g. for S3)")
            q.add_argument("--key-name", help="EC2 key pair for SSH")
            q.add_argument("--spot", action="store_true", help="launch spot instances")
            q.add_argument("--wheel-url", default="", help="install zfalkon from this URL")
            q.add_argument("--vm-idle-seconds", type=float, default=600.0,
                           help="a VM powers itself off after this long idle (safety net)")
            q.add_argument("--keep", action="store_true",
                           help="leave the instances running when stopped")
    p.set_defaults(func=ec2_command)

    p = sub.add_parser("provision", help="run a provisioner beside a broker")
    prov = p.add_subparsers(dest="provision_command", required=True)
    q = prov.add_parser("local", help="worker processes on this host that follow the queue")
    add_policy_options(q)
    q.add_argument("--pool", default="local", help="pool name")
    q.add_argument("--worker-keys", help="worker key bundle")
    p.set_defaults(func=provision_local)
