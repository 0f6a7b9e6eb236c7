"""Cloud storage emulators for the tests: moto's S3 server and gcp-storage-emulator.

Both are real HTTP servers, started as separate processes on a free 127.0.0.1 port and stopped at
the end of the session. They run from their own venv (`make emulators` builds `.venv-emulators/`
from tests/emulators.txt): moto[server] pulls the newest botocore, and the aiobotocore that s3fs
needs pins an older one, so the two cannot share the project's venv. The project talks to them
exactly as it talks to AWS and Google: s3fs/gcsfs over HTTP, pointed there by the standard
variables `AWS_ENDPOINT_URL` and `STORAGE_EMULATOR_HOST`. Nothing here mocks the filesystem layer.

moto runs with IAM enforcement (`INITIAL_NO_AUTH_ACTION_COUNT`): the first three calls create an
administrator, every later call must be signed by a known key and is checked against its
policies, so wrong keys, denied buckets and `role_arn` chains are tested for real.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATORS_BIN = Path(os.environ.get("DIDOMI_MARKETO_EMULATORS", ROOT / ".venv-emulators" / "bin"))
REGION = "us-east-1"
READY_TIMEOUT = 90.0  # a cold moto import takes a few seconds; a loaded 2-core CI box, more

# Never let a credential chain reach a cloud metadata service (169.254.169.254) from a test.
NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "true"}


def unavailable(reason: str) -> None:
    """An emulator or a client library is missing: skip on a developer's box, fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the cloud storage tests)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One emulator process with its log in a temporary file (shown if it fails to start)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name, self.argv = name, argv
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_url: str) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(ready_url, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {Path(self.log.name).read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# S3 (moto)


@dataclass
class S3Emulator:
    endpoint: str
    key: str  # an administrator's access key: everything allowed
    secret: str
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    def client(self, service: str = "s3") -> Any:
        """A botocore client as the administrator (made once: loading a service model is slow)."""
        if service not in self._clients:
            import botocore.session

            self._clients[service] = botocore.session.get_session().create_client(
                service,
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id=self.key,
                aws_secret_access_key=self.secret,
            )
        return self._clients[service]

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def put(self, url: str, data: bytes) -> None:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, url: str) -> None:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client().delete_object(Bucket=bucket, Key=key)

    def create_user(self, name: str, policy: dict[str, Any] | None = None) -> tuple[str, str]:
        """An IAM user with `policy` (none: it may do nothing); returns its access key and secret."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=name)["AccessKey"]
        return k["AccessKeyId"], k["SecretAccessKey"]

    def create_role(self, name: str, policy: dict[str, Any], trusted: str = "*") -> str:
        """A role that principal `trusted` may assume, allowed `policy`; returns its ARN."""
        iam = self.client("iam")
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": trusted}, "Action": "sts:AssumeRole"}],
        }
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        return str(arn)

    def env(self, key: str | None = None, secret: str | None = None) -> dict[str, str | None]:
        """Environment for a CLI run: the standard AWS variables, pointing at the emulator.
        None values unset a variable (a developer's own profile must not leak into a test)."""
        return {
            **NO_METADATA,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key or self.key,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }


def read_only_policy(bucket: str) -> dict[str, Any]:
    """What Didomi's role grants on its export bucket: list it, read its objects."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"},
        ],
    }


@contextmanager
def s3_emulator() -> Iterator[S3Emulator]:
    exe = EMULATORS_BIN / "moto_server"
    if not exe.exists():
        unavailable(f"moto_server not found in {EMULATORS_BIN}: run `make emulators`")
    try:
        import botocore  # noqa: F401
    except ImportError:
        unavailable("botocore is not installed: `pip install -e '.[test]'` (the s3 extra)")
    port = free_port()
    # The first 3 calls (create user, its policy, its key) need no signature; every later one does.
    server = ServerProcess(
        "moto", [str(exe), "-H", "127.0.0.1", "-p", str(port)], {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    )
    endpoint = f"http://127.0.0.1:{port}"
    server.start(endpoint + "/moto-api/")
    try:
        boot = S3Emulator(endpoint, "bootstrap", "bootstrap")
        key, secret = boot.create_user("admin", {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]})  # fmt: skip
        yield S3Emulator(endpoint, key, secret)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# GCS (gcp-storage-emulator)


@dataclass
class GCSEmulator:
    endpoint: str

    def fs(self) -> Any:
        # The core class: gcsfs's default (Extended) one probes the bucket type over gRPC,
        # which the emulator does not speak.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(
            endpoint_url=self.endpoint, token="anon", project="test", skip_instance_cache=True
        )

    def create_bucket(self, name: str) -> None:
        self.fs().mkdir(name)

    def put(self, url: str, data: bytes) -> None:
        self.fs().pipe_file(url.removeprefix("gs://"), data)

    def delete(self, url: str) -> None:
        self.fs().rm_file(url.removeprefix("gs://"))

    def env(self) -> dict[str, str | None]:
        return {**NO_METADATA, "STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_APPLICATION_CREDENTIALS": None}


@contextmanager
def gcs_emulator() -> Iterator[GCSEmulator]:
    exe = EMULATORS_BIN / "gcp-storage-emulator"
    if not exe.exists():
        unavailable(f"gcp-storage-emulator not found in {EMULATORS_BIN}: run `make emulators`")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        unavailable("gcsfs is not installed: `pip install -e '.[test]'` (the gcs extra)")
    port = free_port()
    server = ServerProcess("gcs", [str(exe), "start", "-H", "127.0.0.1", "--port", str(port), "-M", "-q"])
    endpoint = f"http://127.0.0.1:{port}"
    server.start(endpoint + "/storage/v1/b")
    try:
        yield GCSEmulator(endpoint)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Shared helpers


Store = S3Emulator | GCSEmulator


def upload_tree(store: Store, local: Path, url: str) -> int:
    """Copy every file under `local` to `url` (keys relative to `local`); returns the count.
    Reusable for any export tree, e.g. a generated 200,000-user export for the bulk e2e."""
    count = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            store.put(f"{url.rstrip('/')}/{path.relative_to(local).as_posix()}", path.read_bytes())
            count += 1
    return count


def subprocess_env(overrides: dict[str, str | None]) -> dict[str, str]:
    """os.environ with `overrides` applied (None removes a variable), for subprocess.run."""
    env = dict(os.environ)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
