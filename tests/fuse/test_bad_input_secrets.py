"""A secret the user put in a URL never shows in the one line a refused command prints
(cli.py's docstring: "URLs are never quoted whole here: they may carry credentials").

Python's urlsplit ends the netloc at the first '/', '?' or '#': in a URL whose password
holds one (AWS secret keys often hold '/'), the part of the password before it becomes the
"port", and `.port` raises ValueError("Port could not be cast to integer value as '<it>'"),
which `_check_base_url` and `_check_endpoint_url` quote. `corfs publish` has no user-info
check at all: its destination is quoted whole, or ends in botocore's bucket-name message.
The same holds with --base-env, whose whole point is to keep BASE out of sight. An s3:// URL
with an empty netloc (s3:///key:secret@bucket/, a typo) passes the '@' check and is quoted
whole by parse_s3_url's "has no bucket"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mounting import make_image, run_corfs
from tests.servers import FAKE_AWS_ENV

from .util import MIB, assert_one_line_error

KEY_WITH_SLASH = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example key


@pytest.mark.parametrize(
    ("args", "env", "secret"),
    [
        (("mount", f"s3://AKIAEXAMPLE:{KEY_WITH_SLASH}@bucket/images/"), {}, "wJalrXUtnFEMI"),
        (("mount", "https://alice:Xy7#kP2q@files.example.com/disk.raw"), {}, "Xy7"),
        (("mount", "-", "--base-env", "CORFS_TEST_BASE"),
         {"CORFS_TEST_BASE": "https://alice:pw7Secret?x@files.example.com/disk.raw"},
         "pw7Secret"),
        (("mount", "s3://bucket/images/", "--endpoint-url",
          "http://ak:epSecret/rest@127.0.0.1:9/"), {}, "epSecret"),
        (("mount", "s3://AKIAEXAMPLE:123/abcSecretKey@bucket/images/", "--endpoint-url",
          "http://127.0.0.1:9", "--io-timeout", "2"), FAKE_AWS_ENV, "abcSecretKey"),
        (("mount", "s3:///AKIAEXAMPLE:tripleSecret@bucket/images/"), FAKE_AWS_ENV,
         "tripleSecret"),
        (("publish", "IMAGE", "s3://AKIAEXAMPLE:pubSecretKey@bucket/images",
          "--endpoint-url", "http://127.0.0.1:9", "--io-timeout", "2"), FAKE_AWS_ENV,
         "pubSecretKey"),
        (("publish", "IMAGE", "https://alice:hunter2@files.example.com/images/"), {},
         "hunter2"),
        # all digits before the '/': a valid "port", the rest of the password in the path
        (("mount", "https://alice:123/abcSecret@files.example.com/disk.raw"), {}, "abcSecret"),
        (("mount", "s3://bucket/images/", "--endpoint-url",
          "http://ak:123/epSecret2@127.0.0.1:9/"), {}, "epSecret2"),
    ],
    ids=["s3-key-with-slash", "https-password-with-hash", "base-env-password-with-query",
         "endpoint-password-with-slash", "s3-key-digits-then-slash", "s3-triple-slash",
         "publish-s3-userinfo",
         "publish-https-userinfo", "https-digits-then-slash", "endpoint-digits-then-slash"],
)
def test_refused_urls_do_not_show_their_secret(tmp_path: Path, args, env, secret) -> None:
    image = tmp_path / "img.raw"
    make_image(image, MIB, seed=5)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    cache.mkdir(mode=0o700)
    mnt.mkdir()
    argv = [str(image) if a == "IMAGE" else a for a in args]
    if argv[0] == "mount":
        argv[2:2] = [str(cache), str(mnt)]
    result = run_corfs(*argv, timeout=30, env=env)
    assert_one_line_error(result)
    assert secret not in result.stderr, result.stderr
