"""daemon.make_environment_paths_absolute: the path variables libraries read later name the
same files after the daemon's chdir("/") (the mount itself: tests/remote/test_mount_s3.py)."""

from __future__ import annotations

import os

from corfs.daemon import make_environment_paths_absolute


def test_relative_paths_become_absolute_and_others_stay(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {
        "AWS_SHARED_CREDENTIALS_FILE": "creds",
        "AWS_CONFIG_FILE": "~/.aws/config",
        "AWS_CA_BUNDLE": "/etc/ssl/ca.pem",
        "SSL_CERT_FILE": "../ca:1.pem",
        "SSL_CERT_DIR": "certs:/etc/ssl/certs",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "",
        "AWS_DATA_PATH": "models",
        "HOME": "relative-but-not-ours",
    }
    make_environment_paths_absolute(environ)
    assert environ == {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "creds"),
        "AWS_CONFIG_FILE": "~/.aws/config",
        "AWS_CA_BUNDLE": "/etc/ssl/ca.pem",
        "SSL_CERT_FILE": os.path.join(tmp_path.parent, "ca:1.pem"),
        "SSL_CERT_DIR": f"{tmp_path / 'certs'}:/etc/ssl/certs",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "",
        "AWS_DATA_PATH": str(tmp_path / "models"),
        "HOME": "relative-but-not-ours",
    }
