"""Data staging: many tasks reading a few shared S3 inputs, with and without the worker
cache and data-aware dispatch (issue: data to and from workers).

moto's S3 server on 127.0.0.1 holds ``--files`` inputs of ``--size-mb`` each; ``--tasks``
shell tasks each stage one of them (round robin) and checksum it, on a LocalCluster of
``--workers`` single-slot workers, each with its own cache directory (separate machines).
Two scenarios: the caches hold every input (``--files``), and the working set
(``2 * --files`` inputs) is twice what each cache may hold (``--cache-bytes`` of
``--files`` inputs): there FIFO dispatch makes every worker cycle through every input and
LRU thrash, which data-aware dispatch avoids by keeping each input on a few workers.
Three configurations each, same workload:

* ``no cache``: ``--cache-bytes 0`` (every task downloads its input), FIFO dispatch;
* ``cache, fifo``: the worker cache, broker ``--dispatch fifo``;
* ``cache, data-aware``: the worker cache, broker ``--dispatch data`` (the default).

Bytes downloaded are counted by moto itself (its request recorder: every GetObject on
the inputs, times the object size; inputs stay under boto3's multipart threshold so one
download is one GET). Reports tasks/s (median of ``--repeat``) and bytes downloaded.
Writes ``bench/out/data.json``.

    python bench/data.py [--tasks 400] [--files 4] [--size-mb 4] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time
import urllib.request

from zfalkon import Executor, LocalCluster
from zfalkon.provision.sim import MotoServer

BUCKET = "zfalkon-bench"
CONFIGS = {"no cache": (["--cache-bytes", "0"], "fifo"),
           "cache, fifo": ([], "fifo"),
           "cache, data-aware": ([], "data")}


def recorded_gets(moto: MotoServer) -> int:
    """GetObject requests on the inputs since the recorder was last reset."""
    with urllib.request.urlopen(moto.url + "/moto-api/recorder/download-recording") as r:
        lines = r.read().decode().splitlines()
    gets = 0
    for line in lines:
        req = json.loads(line)
        if req.get("method") == "GET" and f"/{BUCKET}/in/" in req.get("url", ""):
            gets += 1
    return gets


def recorder(moto: MotoServer, action: str) -> None:
    urllib.request.urlopen(urllib.request.Request(
        f"{moto.url}/moto-api/recorder/{action}", method="POST")).close()


def run(moto: MotoServer, config: str, tasks: int, files: int, size: int, workers: int,
        cache_bytes: int) -> dict:
    worker_args, dispatch = CONFIGS[config]
    worker_args = worker_args or ["--cache-bytes", str(cache_bytes)]
    env = {"AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with tempfile.TemporaryDirectory() as caches, \
            LocalCluster(workers=0, env=env, broker_args=["--dispatch", dispatch]) as cluster:
        for i in range(workers):
            cluster.add_worker(1, "--cache-dir", os.path.join(caches, str(i)), *worker_args)
        cluster.wait_for_slots(workers)
        recorder(moto, "reset-recording")
        recorder(moto, "start-recording")
        with Executor(cluster.address) as ex:
            start = time.perf_counter()
            futures = [ex.shell("sha256sum input.bin", inputs={
                "input.bin": f"s3://{BUCKET}/in/{i % files}"}) for i in range(tasks)]
            failed = sum(f.result(timeout=600).returncode != 0 for f in futures)
            wall = time.perf_counter() - start
        recorder(moto, "stop-recording")
    gets = recorded_gets(moto)
    return {"config": config, "tasks_per_second": tasks / wall, "gets": gets,
            "bytes_downloaded": gets * size, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = int(args.size_mb * 1024 * 1024)
    rows = []
    recording = tempfile.NamedTemporaryFile(prefix="zfalkon-moto-recording-", delete=False)
    os.environ["MOTO_RECORDER_FILEPATH"] = recording.name  # the moto server inherits it
    with MotoServer() as moto:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for i in range(2 * args.files):
            s3.put_object(Bucket=BUCKET, Key=f"in/{i}", Body=os.urandom(size))
        scenarios = [("ample cache", args.files, 10 * 2**30),
                     ("cache < working set", 2 * args.files, args.files * size)]
        for scenario, files, cache_bytes in scenarios:
            for config in CONFIGS:
                runs = [run(moto, config, args.tasks, files, size, args.workers, cache_bytes)
                        for _ in range(args.repeat)]
                assert all(r["failed"] == 0 for r in runs), runs
                rows.append({
                    "scenario": scenario, "files": files, "cache_bytes": cache_bytes,
                    "config": config,
                    "tasks_per_second": statistics.median(r["tasks_per_second"] for r in runs),
                    "bytes_downloaded": statistics.median(r["bytes_downloaded"] for r in runs),
                    "runs": runs})
    os.unlink(recording.name)
    out = {"tasks": args.tasks, "files": args.files, "size_bytes": size,
           "workers": args.workers, "repeat": args.repeat, "rows": rows}
    path = pathlib.Path(__file__).parent / "out"
    path.mkdir(exist_ok=True)
    (path / "data.json").write_text(json.dumps(out, indent=2))
    for r in rows:
        print(f"{r['scenario']:<20} {r['config']:<20} {r['tasks_per_second']:8.1f} tasks/s  "
              f"{r['bytes_downloaded'] / 2**20:8.1f} MiB downloaded")


if __name__ == "__main__":
    main()
