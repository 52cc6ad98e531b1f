"""zfalkon.staging: declaring files, and real workers staging them in and out, inline and
through S3 (moto's server over HTTP on 127.0.0.1), with the worker cache and data-aware
dispatch."""

from __future__ import annotations

import hashlib
import os

import pytest

from conftest import worker_env
from zfalkon import Executor, LocalCluster, payload
from zfalkon.cache import DataCache
from zfalkon.constants import INLINE_FILE_BYTES
from zfalkon.errors import SerializationError, TaskError
from zfalkon.provision.sim import MotoServer
from zfalkon.staging import locality

BUCKET = "zfalkon-test"


# -- declaring -------------------------------------------------------------------------


@pytest.mark.parametrize("inputs,match", [
    ({"/etc/passwd": b"x"}, "relative path"),
    ({"../up": b"x"}, "relative path"),
    ({"a": b"x" * (INLINE_FILE_BYTES + 1)}, "put it in S3"),
    ({"a": "s3://bucket-only"}, "s3://bucket/key"),
    ({"a": 42}, "not int"),
])
def test_bad_inputs_are_refused_before_sending(inputs, match):
    with pytest.raises(SerializationError, match=match):
        payload.shell_task("true", inputs=inputs)


def test_staging_and_cwd_do_not_mix():
    with pytest.raises(SerializationError, match="drop cwd"):
        payload.shell_task("true", cwd="/tmp", outputs=["x"])


def test_locality_is_the_first_s3_input():
    assert locality({"a": b"x", "b": "/shared/f", "c": "s3://b/k", "d": "s3://b/j"}) == "s3://b/k"
    assert locality({"a": b"x"}) == "" and locality(None) == ""


# -- staging on real workers -----------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        s3 = server.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        yield server, s3


def aws_env(url: str) -> dict[str, str]:
    return {**worker_env(), "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def staged(moto, tmp_path_factory):
    """One worker with a cache directory we can look into."""
    server, s3 = moto
    cache = str(tmp_path_factory.mktemp("cache"))
    with LocalCluster(workers=1, env=aws_env(server.url),
                      worker_args=["--cache-dir", cache]) as cluster, \
            Executor(cluster.address) as ex:
        yield ex, s3, cache


def test_inline_inputs_and_outputs_round_trip(staged):
    ex, _, _ = staged
    r = ex.shell("tr a-z A-Z < in.txt > out.txt && mkdir -p sub && cp data/b.bin sub/c.bin",
                 inputs={"in.txt": b"hello", "data/b.bin": bytes(range(256))},
                 outputs=["out.txt", "sub/c.bin"]).result(timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.files == {"out.txt": b"HELLO", "sub/c.bin": bytes(range(256))}


def test_each_task_runs_in_a_fresh_directory_that_is_removed(staged):
    ex, _, _ = staged
    first = ex.shell("pwd; touch left-behind", inputs={"x": b""}).result(timeout=30)
    second = ex.shell("pwd; ls", inputs={"x": b""}).result(timeout=30)
    assert first.stdout != second.stdout.splitlines()[0] + "\n"
    assert "left-behind" not in second.stdout
    assert not os.path.exists(first.stdout.strip())


def test_s3_stage_in_and_out_with_multipart_sizes(staged):
    ex, s3, _ = staged
    data = os.urandom(20 * 1024 * 1024)  # over boto3's 8 MiB multipart threshold
    s3.put_object(Bucket=BUCKET, Key="in/big.bin", Body=data)
    r = ex.shell("sha256sum big.bin | cut -d' ' -f1 > sum.txt && cp big.bin copy.bin",
                 inputs={"big.bin": f"s3://{BUCKET}/in/big.bin"},
                 outputs={"sum.txt": "", "copy.bin": f"s3://{BUCKET}/out/copy.bin"}
                 ).result(timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.files["sum.txt"].decode().strip() == hashlib.sha256(data).hexdigest()
    assert s3.get_object(Bucket=BUCKET, Key="out/copy.bin")["Body"].read() == data


def test_cache_hit_on_reuse_and_no_stale_data_after_a_change(staged):
    ex, s3, cache_dir = staged
    s3.put_object(Bucket=BUCKET, Key="in/shared.txt", Body=b"version one")
    before = DataCache(cache_dir).stats()
    for _ in range(3):
        r = ex.shell("cat shared.txt", inputs={"shared.txt": f"s3://{BUCKET}/in/shared.txt"}
                     ).result(timeout=30)
        assert r.stdout == "version one"
    after = DataCache(cache_dir).stats()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2
    assert after["downloaded"] - before["downloaded"] == len(b"version one")
    s3.put_object(Bucket=BUCKET, Key="in/shared.txt", Body=b"version two")  # new ETag
    r = ex.shell("cat shared.txt", inputs={"shared.txt": f"s3://{BUCKET}/in/shared.txt"}
                 ).result(timeout=30)
    assert r.stdout == "version two"


def test_shared_path_inputs_are_linked(staged, tmp_path):
    ex, _, _ = staged
    shared = tmp_path / "on-the-shared-fs.txt"
    shared.write_text("shared")
    r = ex.shell("cat f.txt", inputs={"f.txt": str(shared)}).result(timeout=30)
    assert r.stdout == "shared"


@pytest.mark.parametrize("inputs,outputs,message", [
    ({"x": "s3://zfalkon-test/no/such/key"}, [], "input 'x': s3://zfalkon-test/no/such/key "
                                                "does not exist"),
    ({"x": "s3://no-such-bucket-zf/key"}, [], "input 'x'"),
    ({"x": "/no/such/shared/file"}, [], "/no/such/shared/file does not exist"),
    ({}, ["never-written.txt"], "output 'never-written.txt' was not created"),
])
def test_missing_input_or_output_is_a_clear_task_error(staged, inputs, outputs, message):
    ex, _, _ = staged
    with pytest.raises(TaskError) as info:
        ex.shell("true", inputs=inputs, outputs=outputs).result(timeout=30)
    assert info.value.remote_type == "StagingError" and message in str(info.value)


def test_an_inline_output_over_the_limit_is_an_error_naming_s3(staged):
    ex, _, _ = staged
    size = INLINE_FILE_BYTES + 1
    with pytest.raises(TaskError, match="inline limit; stage it to S3"):
        ex.shell(f"head -c {size} /dev/zero > big", outputs=["big"]).result(timeout=30)


def test_a_failed_command_returns_its_result_not_its_outputs(staged):
    ex, _, _ = staged
    r = ex.shell("echo partial > out.txt; exit 3", outputs=["out.txt"]).result(timeout=30)
    assert r.returncode == 3 and r.files == {}


# -- data-aware dispatch ---------------------------------------------------------------


def run_two_inputs(moto, tmp_path, dispatch: str) -> tuple[float, int]:
    """Two single-slot workers with separate caches (two machines); 40 tasks on two S3
    inputs, interleaved. Returns the share of tasks that ran where their input was
    cached first, and the bytes the workers downloaded."""
    server, s3 = moto
    for name in ("a", "b"):
        s3.put_object(Bucket=BUCKET, Key=f"da/{name}", Body=name.encode() * 100_000)
    caches = [str(tmp_path / f"{dispatch}-cache{i}") for i in range(2)]
    with LocalCluster(workers=0, env=aws_env(server.url),
                      broker_args=["--dispatch", dispatch]) as cluster:
        for c in caches:
            cluster.add_worker(1, "--cache-dir", c)
        cluster.wait_for_slots(2)
        with Executor(cluster.address) as ex:
            def task(name: str, seconds: float):
                return ex.shell(f"sleep {seconds}; wc -c < {name}",
                                inputs={name: f"s3://{BUCKET}/da/{name}"})
            # Warm: one task each, at once: each worker gets one (fair share).
            first = {n: task(n, 0.5) for n in "ab"}
            home = {n: f.result(timeout=30).worker.rsplit("/", 1)[0] for n, f in first.items()}
            assert home["a"] != home["b"]
            futures = [(n, task(n, 0.05)) for _ in range(20) for n in "ab"]
            results = [(n, f.result(timeout=60)) for n, f in futures]
    assert all(r.stdout.strip() == "100000" for _, r in results)
    at_home = sum(r.worker.rsplit("/", 1)[0] == home[n] for n, r in results) / len(results)
    downloaded = sum(DataCache(c).stats()["downloaded"] for c in caches)
    return at_home, downloaded


def test_data_aware_dispatch_sends_tasks_to_their_data(moto, tmp_path):
    at_home, downloaded = run_two_inputs(moto, tmp_path, "data")
    assert at_home >= 0.8, at_home
    assert downloaded <= 4 * 100_000  # at most each input on each worker
    # The control: plain FIFO dispatch on the same workload does worse on one count.
    fifo_home, fifo_downloaded = run_two_inputs(moto, tmp_path, "fifo")
    assert fifo_home < at_home or fifo_downloaded > downloaded, (fifo_home, fifo_downloaded)


def test_names_cannot_lead_outside_the_task_directory(tmp_path):
    """Checked again on the worker: a hand-made task, or a file under a symlinked shared
    input, must not write outside the task's directory."""
    from zfalkon.staging import INLINE, PATH, Stager, StagingError

    shared = tmp_path / "shared"
    shared.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    stager = Stager(None)
    with pytest.raises(StagingError, match="'ref/x' would be inside input 'ref'"):
        stager.stage_in([["ref", PATH, str(shared)], ["ref/x", INLINE, b"evil"]], str(work))
    assert not (shared / "x").exists()
    for name in ("../up", "/etc/x", "a/../../x"):
        with pytest.raises(StagingError, match="relative path"):
            stager.stage_in([[name, INLINE, b""]], str(work))
    os.symlink(shared / "secret", work / "out")
    (shared / "secret").write_text("not yours")
    with pytest.raises(StagingError, match="symbolic link"):
        stager.stage_out([["out", ""]], str(work))


def test_cached_files_are_read_only(tmp_path):
    cache = DataCache(str(tmp_path))
    path, _ = cache.get("k", lambda tmp: open(tmp, "wb").close())
    assert os.stat(path).st_mode & 0o777 == 0o444


# -- links: nothing staged in or out goes through a symbolic link (issue 12) -----------


@pytest.fixture
def dirs(tmp_path):
    """A task directory, and outside it a shared file, a shared directory and a secret."""
    from zfalkon.staging import Stager

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "file").write_bytes(b"shared")
    (tmp_path / "secret").write_bytes(b"secret")
    work = tmp_path / "work"
    work.mkdir()
    return Stager(None), work, shared, tmp_path / "secret"


def untouched(shared) -> bool:
    return sorted(p.name for p in shared.iterdir()) == ["file"] and \
        (shared / "file").read_bytes() == b"shared"


@pytest.mark.parametrize("first,second,message", [
    ("a", "./a", "inputs 'a' and './a' are the same file"),
    ("a", "a/", "inputs 'a' and 'a/' are the same file"),
    ("d/a", "d//./a", "inputs 'd/a' and 'd//./a' are the same file"),
    ("d", "./d/a", "input './d/a' would be inside input 'd'"),
])
def test_inputs_that_are_one_file_are_refused_by_client_and_slot(dirs, first, second, message):
    from zfalkon.staging import INLINE, PATH, StagingError

    stager, work, shared, _ = dirs
    with pytest.raises(SerializationError, match=message):
        payload.shell_task("true", inputs={first: str(shared / "file"), second: b"evil"})
    # The slot checks again (a hand-made task), in either order, before placing anything.
    for inputs in ([[first, PATH, str(shared / "file")], [second, INLINE, b"evil"]],
                   [[second, INLINE, b"evil"], [first, PATH, str(shared / "file")]]):
        with pytest.raises(StagingError) as info:
            stager.stage_in(inputs, str(work))
        assert first in str(info.value) and second in str(info.value)
        assert list(work.iterdir()) == []
    assert untouched(shared)


def test_dot_dot_and_the_directory_itself_are_not_file_names():
    for name in ("x/../a", ".", "./", "a/.."):
        with pytest.raises(SerializationError, match="relative path"):
            payload.shell_task("true", inputs={name: b""})


def test_an_input_never_writes_through_a_link_in_the_task_directory(dirs):
    """Links already there (made by an earlier input, or planted): no input replaces one,
    writes through one, or creates its directories through one."""
    from zfalkon.staging import INLINE, PATH, StagingError

    stager, work, shared, _ = dirs
    os.symlink(shared / "file", work / "a")
    os.symlink(shared, work / "d")
    (work / "x").mkdir()
    os.symlink(shared, work / "x" / "y")
    cases = [("a", "already in the task's directory"),
             ("d/new", "'d' is a symbolic link"),
             ("d/file", "'d' is a symbolic link"),
             ("x/y/z/new", "'x/y' is a symbolic link")]
    for name, message in cases:
        for kind, value in ((INLINE, b"evil"), (PATH, str(work / "x"))):
            with pytest.raises(StagingError, match=message):
                stager.stage_in([[name, kind, value]], str(work))
    assert untouched(shared)
    assert (work / "x").exists() and sorted(os.listdir(work / "x")) == ["y"]


def test_stage_in_places_nested_inputs_in_real_directories(dirs):
    from zfalkon.staging import INLINE, PATH

    stager, work, shared, _ = dirs
    stager.stage_in([["p/q/in.txt", INLINE, b"hi"], ["p/link", PATH, str(shared / "file")],
                     ["p/r/", INLINE, b"r"]], str(work))
    assert (work / "p" / "q" / "in.txt").read_bytes() == b"hi"
    assert os.readlink(work / "p" / "link") == str(shared / "file")
    assert (work / "p" / "r").read_bytes() == b"r"
    assert not os.path.islink(work / "p") and not os.path.islink(work / "p" / "q")


def test_stage_out_follows_no_link_the_task_made(dirs):
    from zfalkon.staging import StagingError

    stager, work, shared, secret = dirs
    os.symlink(secret, work / "out.txt")  # ln -s /etc/passwd out.txt
    os.symlink(secret.parent, work / "up")  # ln -s .. up; outputs=["up/secret"]
    (work / "sub").mkdir()
    os.symlink(secret.parent, work / "sub" / "up")
    os.mkfifo(work / "fifo")  # would block a plain open
    (work / "dir").mkdir()
    cases = [("out.txt", "'out.txt' is a symbolic link"),
             ("up/secret", "'up' is a symbolic link"),
             ("sub/up/secret", "'sub/up' is a symbolic link"),
             ("fifo", "'fifo' is not a regular file"),
             ("dir", "'dir' is not a regular file"),
             ("none/x", "'none/x' was not created by the task")]
    for name, message in cases:
        for dest in ("", "s3://bucket/never-used"):
            with pytest.raises(StagingError, match=message):
                stager.stage_out([[name, dest]], str(work))
    (work / "real.txt").write_bytes(b"mine")
    assert stager.stage_out([["real.txt", ""], ["./real.txt", ""]], str(work)) == {
        "real.txt": b"mine", "./real.txt": b"mine"}


def test_links_on_a_real_worker_fail_the_task_and_leave_the_slot_working(executor, tmp_path):
    """End to end: the attacks as tasks on a LocalCluster's worker."""
    import msgpack

    from zfalkon.staging import INLINE, PATH

    shared = tmp_path / "shared.txt"
    shared.write_bytes(b"shared")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    with pytest.raises(SerializationError, match="same file"):
        executor.shell("true", inputs={"a": str(shared), "./a": b"evil"})
    # A hand-made task, as a client without that check would send it.
    blob = msgpack.packb((payload.TASK_SHELL, "cat a", None, None, None,
                          [[["a", PATH, str(shared)], ["./a", INLINE, b"evil"]], []]))
    with pytest.raises(TaskError, match="are the same file") as info:
        executor._submit_blob(blob).result(timeout=30)
    assert info.value.remote_type == "StagingError"
    for command, output, message in [
            (f"ln -s {secret} out.txt", "out.txt", "symbolic link"),
            (f"ln -s {tmp_path} d", "d/secret.txt", "'d' is a symbolic link"),
            ("mkfifo out.txt", "out.txt", "not a regular file")]:
        with pytest.raises(TaskError, match=message) as info:
            executor.shell(command, outputs=[output]).result(timeout=30)
        assert info.value.remote_type == "StagingError"
    assert shared.read_bytes() == b"shared"
    r = executor.shell("cat in.txt > out.txt", inputs={"in.txt": b"still fine"},
                       outputs=["out.txt"]).result(timeout=30)
    assert r.files == {"out.txt": b"still fine"}
