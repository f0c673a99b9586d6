"""index.json under concurrent publishes, and S3 publishing with the least permissions.

- Two `corfs publish` processes into one DEST both end up in index.json: a directory's update
  is under a flock, S3's is a conditional write (If-Match / If-None-Match) that merges again
  when another publish's update came first. For S3 a proxy holds one publish's index PUT
  while the other runs whole: without the conditional write its entry was overwritten.
- S3 publish needs only GetObject and PutObject (HEAD is GetObject): no ListBucket, no
  HeadBucket. Moto enforces an IAM policy; a proxy turns its 404s into the 403s S3 gives a
  client without ListBucket for keys that are not there.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from corfs.manifest import parse_index
from tests.mounting import corfs_command, corfs_env, make_image, run_corfs
from tests.proxy import FaultProxy
from tests.servers import FAKE_AWS_ENV, TEST_BUCKET, Moto

CS = 64 << 10


def _s3_args(endpoint: str) -> list[str]:
    return ["--endpoint-url", endpoint, "--region", "us-east-1", "--no-progress", "-j", "1",
            "--chunk-size", str(CS)]


def _index_at(client, bucket: str, prefix: str) -> dict[str, int | None]:
    return parse_index(client.get_object(Bucket=bucket, Key=f"{prefix}index.json")["Body"].read())


def test_concurrent_publishes_into_one_directory_keep_every_index_entry(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    groups = [
        [make_image(src / f"{who}{i:02d}.raw", 4096, seed=100 * n + i) for i in range(15)]
        for n, who in enumerate("ab")
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    procs = [
        subprocess.Popen(
            corfs_command("publish", *images, dest, "--chunk-size", "4K", "-j", "1",
                          "--no-progress"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=corfs_env(),
        )
        for images in groups
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    listed = set(parse_index((dest / "index.json").read_bytes()))
    assert listed == {f"{p.name}.corfs.json" for images in groups for p in images}


def test_concurrent_publishes_to_s3_keep_both_index_entries(tmp_path: Path, moto_server) -> None:
    a = make_image(tmp_path / "a.raw", 2 * CS, seed=1)
    b = make_image(tmp_path / "b.raw", 2 * CS, seed=2)
    prefix = f"race-{uuid.uuid4().hex[:8]}/"
    url = f"s3://{TEST_BUCKET}/{prefix}"
    # a's first index write is held 3 s on its way; b publishes whole meanwhile.
    proxy = FaultProxy(
        upstream_port=moto_server.port,
        match=lambda line: line.startswith("PUT ") and f"/{prefix}index.json" in line,
    ).start()
    try:
        proxy.inject("delay:3")
        slow = subprocess.Popen(
            corfs_command("publish", a, url, *_s3_args(proxy.url)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=corfs_env(FAKE_AWS_ENV),
        )
        try:
            deadline = time.monotonic() + 30
            while not any(fault for _, fault in proxy.requests):
                assert slow.poll() is None and time.monotonic() < deadline, "no index write held"
                time.sleep(0.02)
            fast = run_corfs("publish", b, url, *_s3_args(moto_server.endpoint), env=FAKE_AWS_ENV)
            assert fast.returncode == 0, fast.stderr
            assert slow.poll() is None, "the held write was not held over the other publish"
            _, err = slow.communicate(timeout=60)
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
        assert slow.returncode == 0, err
    finally:
        proxy.stop()
    assert set(_index_at(moto_server.client(), TEST_BUCKET, prefix)) == {
        "a.raw.corfs.json",
        "b.raw.corfs.json",
    }


# ---- S3 without ListBucket -----------------------------------------------------------------

_OBJECTS_ONLY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:aws:s3:::{TEST_BUCKET}/*",
        }
    ],
}


@pytest.fixture
def objects_only(tmp_path: Path):
    """A moto that checks IAM, with TEST_BUCKET and the credentials (env) of a user allowed
    GetObject and PutObject on its objects only."""
    # Requests moto lets through before it checks: its readiness probe and the four set-up
    # calls below; every later one is checked.
    server = Moto(tmp_path / "moto-iam", {"INITIAL_NO_AUTH_ACTION_COUNT": "5"}).start()
    try:
        import boto3

        root = dict(endpoint_url=server.endpoint, region_name="us-east-1",
                    aws_access_key_id="x", aws_secret_access_key="x")
        boto3.client("s3", **root).create_bucket(Bucket=TEST_BUCKET)
        iam = boto3.client("iam", **root)
        iam.create_user(UserName="publisher")
        iam.put_user_policy(UserName="publisher", PolicyName="objects",
                            PolicyDocument=json.dumps(_OBJECTS_ONLY))
        key = iam.create_access_key(UserName="publisher")["AccessKey"]
        env = {**FAKE_AWS_ENV, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_SESSION_TOKEN": ""}
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        with pytest.raises(Exception, match="AccessDenied"):  # the policy is enforced
            client.list_objects_v2(Bucket=TEST_BUCKET)
        yield server, client, env
    finally:
        server.stop()


def test_s3_publish_needs_no_list_permission(tmp_path: Path, objects_only) -> None:
    server, client, env = objects_only
    # In front of moto: a key that is not there is a 403, as S3 answers without ListBucket.
    proxy = FaultProxy(upstream_port=server.port, match=lambda line: True).start()
    try:
        proxy.inject(*["missing_is_403"] * 1000)
        url = f"s3://{TEST_BUCKET}/least/"
        for seed, name in enumerate(["a.raw", "b.raw", "a.raw"]):  # a.raw again: nothing new
            image = make_image(tmp_path / name, 3 * CS, seed=seed % 2)
            result = run_corfs("publish", image, url, *_s3_args(proxy.url), env=env)
            assert result.returncode == 0, result.stderr
    finally:
        proxy.stop()
    assert set(_index_at(client, TEST_BUCKET, "least/")) == {"a.raw.corfs.json",
                                                               "b.raw.corfs.json"}
    listings = [line for line, _ in proxy.requests
                if line.startswith((f"GET /{TEST_BUCKET}?", f"GET /{TEST_BUCKET}/?"))]
    assert not listings


def test_a_directory_index_update_is_durable_before_its_lock_is_released(
    tmp_path: Path,
) -> None:
    """The order of the system calls of `corfs publish` into a directory, seen by strace: the
    new index.json is fsynced before it is renamed into place, and DEST (the directory holding
    its new name) is fsynced after the rename and before the index lock is let go; a power cut
    after the publish returns cannot lose its entry (nothing lists DEST to mend it later)."""
    image = make_image(tmp_path / "one.raw", 4096, seed=7)
    dest = tmp_path / "dest"
    dest.mkdir()
    traces = tmp_path / "strace"
    traces.mkdir()
    result = subprocess.run(
        # -ff: a file per thread, so no call is split by another thread's
        # -y: descriptors shown with their paths (names are given relative to held dirs)
        ["strace", "-ff", "-qq", "-y", "-o", str(traces / "t"), "-e",
         "trace=openat,rename,renameat,renameat2,fsync,fdatasync,flock,close",
         *corfs_command("publish", image, dest, "--chunk-size", "4K", "-j", "1",
                        "--no-progress")],
        capture_output=True, text=True, env=corfs_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The thread that updated the index made every call below.
    per_thread = [trace.read_text().splitlines() for trace in traces.iterdir()]
    (calls,) = [lines for lines in per_thread
                if any(line.startswith("rename") and '"index.json"' in line for line in lines)]
    lock_open = next(i for i, c in enumerate(calls) if "index.lock" in c and "openat(" in c)
    lock_fd = calls[lock_open].rsplit("= ", 1)[1].strip()
    lock_taken = next(i for i, c in enumerate(calls)
                      if i > lock_open and c.startswith(f"flock({lock_fd}, LOCK_EX"))
    lock_released = next(i for i, c in enumerate(calls)
                         if i > lock_taken and c.startswith(f"close({lock_fd})"))
    renamed = [i for i, c in enumerate(calls)
               if c.startswith("rename") and f'<{dest}>, "index.json"' in c]
    assert len(renamed) == 1 and lock_taken < renamed[0] < lock_released, calls
    tmp_name = calls[renamed[0]].split('"')[1]
    tmp_open = max(i for i, c in enumerate(calls[: renamed[0]])
                   if c.startswith("openat(") and f'"{tmp_name}"' in c)
    tmp_fd = calls[tmp_open].rsplit("= ", 1)[1].strip()
    assert any(c.startswith(f"fsync({tmp_fd})")
               for c in calls[tmp_open : renamed[0]]), calls[tmp_open : renamed[0]]
    # DEST is held by a descriptor (strace -y names it): fsynced between the two
    assert any(c.startswith("fsync(") and f"<{dest}>)" in c
               for c in calls[renamed[0] : lock_released]), calls[renamed[0] : lock_released]
