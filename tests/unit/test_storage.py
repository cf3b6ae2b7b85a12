"""The storage contract: written once, run on the local folder and on S3.

S3 is moto's S3 server on 127.0.0.1, spoken to over real HTTP. moto ignores the
signature and the age of a presigned URL, where S3 refuses a bad or expired one,
so `PresignGate` in front of it checks both, to the AWS SigV4 spec.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import os
import stat
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from werkzeug.serving import make_server

from fluxserve.errors import ConfigError
from fluxserve.storage import LocalStorage, Storage, open_storage
from fluxserve.storage.local import FILES_ROUTE
from fluxserve.storage.s3 import S3Storage

from conftest import make_settings, serve_asgi

# Dummy credentials, passed as arguments so nothing reads the environment or ~/.aws.
ACCESS_KEY = "AKIAFLUXSERVETEST"
SECRET_KEY = "fluxserve-test-secret"
REGION = "us-east-1"

TRAVERSALS = ["../escape.png", "a/../../escape.png", "/abs.png", "a//b.png", "./a.png", "", "a/"]


class PresignGate:
    """Checks presigned URLs as S3 does, then hands every request on to moto.

    The signature is recomputed here from the spec, not by botocore, which made
    it, so a URL signed for the wrong host, key, region or secret is refused.
    """

    def __init__(self, app: Any, region: str, secrets: dict[str, str]) -> None:
        self.app = app
        self.region = region
        self.secrets = secrets

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if any(name == "X-Amz-Signature" for name, _ in query):
            refusal = self._refusal(environ, query)
            if refusal is not None:
                body = f"<Error><Code>{refusal[0]}</Code><Message>{refusal[1]}</Message></Error>"
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [body.encode()]
        result: Iterable[bytes] = self.app(environ, start_response)
        return result

    def _refusal(
        self, environ: dict[str, Any], query: list[tuple[str, str]]
    ) -> tuple[str, str] | None:
        params = dict(query)
        access_key, scope = params["X-Amz-Credential"].split("/", 1)
        secret = self.secrets.get(access_key)
        if secret is None:
            return "InvalidAccessKeyId", "The AWS Access Key Id does not exist in our records."
        if scope.split("/")[1] != self.region:
            return "AuthorizationQueryParametersError", f"Credential must name {self.region}"
        signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if datetime.now(UTC) > signed_at + timedelta(seconds=int(params["X-Amz-Expires"])):
            return "AccessDenied", "Request has expired"
        expected = _presigned_signature(environ, query, secret, scope)
        if not hmac.compare_digest(params["X-Amz-Signature"], expected):
            return "SignatureDoesNotMatch", "The request signature we calculated does not match."
        return None


def _presigned_signature(
    environ: dict[str, Any], query: list[tuple[str, str]], secret: str, scope: str
) -> str:
    """SigV4 for a presigned request: canonical request, string to sign, HMAC chain."""

    def encode(text: str) -> str:
        return quote(text, safe="-_.~")

    params = dict(query)
    signed_headers = params["X-Amz-SignedHeaders"].split(";")
    canonical_request = "\n".join(
        [
            environ["REQUEST_METHOD"],
            environ["RAW_URI"].split("?", 1)[0],  # the path as sent, still encoded
            "&".join(
                f"{name}={value}"
                for name, value in sorted(
                    (encode(name), encode(value))
                    for name, value in query
                    if name != "X-Amz-Signature"
                )
            ),
            "".join(
                f"{name}:{environ['HTTP_' + name.upper().replace('-', '_')].strip()}\n"
                for name in signed_headers
            ),
            ";".join(signed_headers),
            "UNSIGNED-PAYLOAD",
        ]
    )
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret}".encode()
    for part in scope.split("/"):  # date, region, service, "aws4_request"
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server behind `PresignGate`, in a thread, on 127.0.0.1."""
    app = PresignGate(
        DomainDispatcherApplication(create_backend_app), REGION, {ACCESS_KEY: SECRET_KEY}
    )
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str) -> Any:
    """A plain boto3 client, to set up buckets and look behind `S3Storage`."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


@pytest.fixture
def bucket(s3_admin: Any) -> str:
    """A fresh, empty bucket for one test."""
    name = f"fluxserve-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=name)
    return name


def s3_storage(
    endpoint: str, bucket: str, *, secret_access_key: str = SECRET_KEY, **options: Any
) -> S3Storage:
    return S3Storage(
        bucket,
        endpoint_url=endpoint,
        region=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=secret_access_key,
        **options,
    )


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "local":
        root = tmp_path / "files"
        root.mkdir()
        # Serves the folder by file name, as fluxserve's own /files route does
        # (that route is tested with the API); here only the URL mapping counts.
        app = Starlette(routes=[Mount(FILES_ROUTE, StaticFiles(directory=root))])
        async with serve_asgi(app) as base_url:
            yield LocalStorage(root, base_url)
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        yield s3_storage(endpoint, request.getfixturevalue("bucket"))


async def test_put_then_get(storage: Storage) -> None:
    await storage.put("results/t1/image.png", b"\x89PNG first", "image/png")
    assert await storage.get("results/t1/image.png") == b"\x89PNG first"


async def test_get_missing_is_none(storage: Storage) -> None:
    await storage.put("results/t1/image.png", b"x", "image/png")
    assert await storage.get("results/t1/other.png") is None
    assert await storage.get("results/t1") is None  # a "folder" holds no file
    assert await storage.get("results/t1/image.png/inner") is None


async def test_put_overwrites(storage: Storage) -> None:
    await storage.put("uploads/a.png", b"old", "image/png")
    await storage.put("uploads/a.png", b"new and longer", "image/png")
    assert await storage.get("uploads/a.png") == b"new and longer"


async def test_delete(storage: Storage) -> None:
    await storage.put("uploads/a.png", b"x", "image/png")
    await storage.put("uploads/b.png", b"y", "image/png")
    await storage.delete("uploads/a.png")
    assert await storage.get("uploads/a.png") is None
    assert await storage.get("uploads/b.png") == b"y"
    await storage.delete("uploads/a.png")
    await storage.delete("never/was.png")


@pytest.mark.parametrize("key", TRAVERSALS)
async def test_invalid_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        await storage.put(key, b"x", "image/png")
    with pytest.raises(ValueError, match="invalid storage key"):
        await storage.get(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        await storage.delete(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.url(key)


@pytest.mark.parametrize("key", ["results/t1/image.png", "uploads/a photo ü+1.png"])
async def test_url_downloads_the_file(storage: Storage, key: str) -> None:
    await storage.put(key, b"\x89PNG bytes", "image/png")
    url = storage.url(key)
    assert url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG bytes"
    assert response.headers["content-type"] == "image/png"


def test_local_paths_stay_under_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "https://img.example.com/")
    assert storage.path_for("results/t1/image.png") == tmp_path / "results" / "t1" / "image.png"
    assert all(storage.path_for(key) is None for key in TRAVERSALS)
    assert storage.url("results/t1/a b.png") == "https://img.example.com/files/results/t1/a%20b.png"


async def test_local_files_get_the_mode_the_umask_gives_new_files(tmp_path: Path) -> None:
    before = os.umask(0o027)
    try:
        storage = LocalStorage(tmp_path / "files", "https://img.example.com/")
    finally:
        os.umask(before)
    await storage.put("results/t1/image.png", b"\x89PNG bytes", "image/png")
    path = storage.path_for("results/t1/image.png")
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_a_writer_killed_midway_leaves_nothing_among_the_files(tmp_path: Path) -> None:
    root = tmp_path / "files"
    storage = LocalStorage(root, "https://img.example.com/")
    await storage.put("results/t1/image.png", b"\x89PNG bytes", "image/png")
    assert [p.relative_to(root).as_posix() for p in root.rglob("*")] == [
        "results",
        "results/t1",
        "results/t1/image.png",
    ]
    assert list(storage.partials.iterdir()) == []
    # What a killed writer leaves: a partial file, beside the served tree.
    stale, fresh = storage.partials / "tmpstale", storage.partials / "tmpfresh"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    os.utime(stale, (1_000.0, 1_000.0))
    assert await storage.remove_stale_partials(started_before=2_000.0) == 1
    assert list(storage.partials.iterdir()) == [fresh]


async def test_s3_keys_go_under_the_prefix(s3_endpoint: str, s3_admin: Any, bucket: str) -> None:
    storage = s3_storage(s3_endpoint, bucket, prefix="/fluxserve/prod/")
    await storage.put("results/t1/image.png", b"x", "image/png")
    listing = s3_admin.list_objects_v2(Bucket=bucket)
    assert [item["Key"] for item in listing["Contents"]] == ["fluxserve/prod/results/t1/image.png"]
    assert "/fluxserve/prod/results/t1/image.png?" in storage.url("results/t1/image.png")


async def test_s3_presigned_url_expires(s3_endpoint: str, bucket: str) -> None:
    # X-Amz-Date is cut to the second, so a 2 s URL has at least 1 s left here.
    storage = s3_storage(s3_endpoint, bucket, url_lifetime=2)
    await storage.put("results/t1/image.png", b"x", "image/png")
    url = storage.url("results/t1/image.png")
    assert "X-Amz-Expires=2&" in url
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        await asyncio.sleep(2.5)
        expired = await client.get(url)
    assert expired.status_code == 403
    assert "Request has expired" in expired.text


async def test_s3_url_signed_with_a_wrong_secret_is_refused(s3_endpoint: str, bucket: str) -> None:
    """Shows the gate checks signatures, so the passing URLs above are truly valid."""
    await s3_storage(s3_endpoint, bucket).put("a.png", b"x", "image/png")
    forged = s3_storage(s3_endpoint, bucket, secret_access_key="not-the-secret").url("a.png")
    async with httpx.AsyncClient() as client:
        response = await client.get(forged)
    assert response.status_code == 403
    assert "SignatureDoesNotMatch" in response.text


async def test_s3_missing_bucket_is_an_error_not_a_missing_file(s3_endpoint: str) -> None:
    storage = s3_storage(s3_endpoint, f"fluxserve-absent-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        await storage.get("a.png")


@pytest.mark.parametrize("lifetime", [0, 7 * 24 * 3600 + 1])
def test_s3_url_lifetime_is_bounded_by_sigv4(lifetime: int) -> None:
    with pytest.raises(ValueError, match="7 days"):
        S3Storage("bucket", region=REGION, url_lifetime=lifetime)


def test_s3_without_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    monkeypatch.delitem(sys.modules, "fluxserve.storage.s3")
    with pytest.raises(ConfigError, match=r"pip install 'fluxserve\[s3\]'"):
        importlib.import_module("fluxserve.storage.s3")


def test_open_storage_defaults_to_the_local_folder(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, public_url="https://img.example.com")
    storage = open_storage(settings)
    assert isinstance(storage, LocalStorage)
    assert storage.root == settings.files_dir
    assert storage.url("a.png") == "https://img.example.com/files/a.png"


def test_open_storage_s3_needs_a_bucket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="s3_bucket"):
        open_storage(make_settings(tmp_path, storage="s3"))


def test_open_storage_s3_needs_both_halves_of_a_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, storage="s3", s3_bucket="b", s3_access_key_id="AKIA")
    with pytest.raises(ConfigError, match="s3_secret_access_key"):
        open_storage(settings)


async def test_open_storage_builds_s3_from_settings(
    tmp_path: Path, s3_endpoint: str, s3_admin: Any, bucket: str
) -> None:
    settings = make_settings(
        tmp_path,
        storage="s3",
        s3_bucket=bucket,
        s3_prefix="fs",
        s3_endpoint_url=s3_endpoint,
        s3_region=REGION,
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SecretStr(SECRET_KEY),
        s3_url_lifetime=600,
        s3_addressing_style="path",
    )
    storage = open_storage(settings)
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.url_lifetime) == (bucket, "fs/", 600)
    await storage.put("a.png", b"x", "image/png")
    assert s3_admin.get_object(Bucket=bucket, Key="fs/a.png")["Body"].read() == b"x"
    assert f"{s3_endpoint}/{bucket}/fs/a.png?" in storage.url("a.png")


def test_settings_refuse_a_url_lifetime_past_7_days(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="s3_url_lifetime"):
        make_settings(tmp_path, s3_url_lifetime=7 * 24 * 3600 + 1)


# A storage's own URLs back to their keys ---------------------------------------------


@pytest.mark.parametrize("key", ["results/t1/image.png", "uploads/a b/0f3c/photo ü+1%.png"])
async def test_own_urls_map_back_to_their_keys(storage: Storage, key: str) -> None:
    assert storage.key_for_url(storage.url(key)) == key


async def test_other_urls_map_to_no_key(storage: Storage) -> None:
    url = storage.url("uploads/a.png")
    for other in [
        "https://example.com/files/uploads/a.png",
        url.replace("127.0.0.1", "localhost", 1),  # the same server, by another name
        url.replace("http://", "https://", 1),
        url.replace("uploads/a.png", "uploads/../secret.png", 1),
        url.replace("uploads/a.png", "uploads//a.png", 1),
        "data:image/png;base64,iVBORw0KGgo=",
        "http://[::1/files/a.png",  # not parseable
        "not a url",
        "",
    ]:
        assert storage.key_for_url(other) is None, other


def test_local_urls_under_a_public_url_with_a_path(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "https://img.example.com/flux/")
    url = storage.url("uploads/a.png")
    assert url == "https://img.example.com/flux/files/uploads/a.png"
    assert storage.key_for_url(url) == "uploads/a.png"
    assert storage.key_for_url("HTTPS://IMG.Example.com/flux/files/uploads/a.png") == (
        "uploads/a.png"
    )
    assert storage.key_for_url(url + "?download=1") == "uploads/a.png"
    assert storage.key_for_url("https://img.example.com/files/uploads/a.png") is None
    assert storage.key_for_url("https://img.example.com/flux/other/uploads/a.png") is None


async def test_s3_urls_map_back_only_within_the_bucket_and_prefix(
    s3_endpoint: str, bucket: str
) -> None:
    storage = s3_storage(s3_endpoint, bucket, prefix="fluxserve/prod")
    url = storage.url("uploads/a.png")
    assert storage.key_for_url(url) == "uploads/a.png"
    # The key is the secret, as with local files: an unsigned or old URL maps too.
    assert storage.key_for_url(url.split("?")[0]) == "uploads/a.png"
    other_prefix = s3_storage(s3_endpoint, bucket, prefix="fluxserve/staging")
    assert storage.key_for_url(other_prefix.url("uploads/a.png")) is None
    other_bucket = s3_storage(s3_endpoint, f"{bucket}-other", prefix="fluxserve/prod")
    assert storage.key_for_url(other_bucket.url("uploads/a.png")) is None


@pytest.mark.parametrize("style", ["virtual", "path"])
def test_s3_urls_map_back_on_aws_in_either_addressing_style(style: str) -> None:
    storage = S3Storage(
        "fluxserve-images",
        region="eu-west-1",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        addressing_style=style,
    )
    url = storage.url("results/t1/image.png")
    host = urlsplit(url).netloc
    if style == "virtual":
        assert host.startswith("fluxserve-images.s3.")
    else:
        assert urlsplit(url).path.startswith("/fluxserve-images/")
    assert storage.key_for_url(url) == "results/t1/image.png"
    assert storage.key_for_url(url.replace("fluxserve-images", "someone-else", 1)) is None
