"""Result files in an S3-compatible bucket, handed out as presigned GET URLs.

Imported only when `storage = "s3"` is chosen, so boto3 stays an optional extra.
boto3 blocks, so every call that talks to the server runs in a thread.
"""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from fluxserve.errors import ConfigError
from fluxserve.storage.base import check_key, valid_key

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
except ImportError as exc:
    raise ConfigError("storage = 's3' needs boto3: pip install 'fluxserve[s3]'") from exc

# SigV4 refuses presigned URLs that would live longer than 7 days.
MAX_URL_LIFETIME = 7 * 24 * 3600

AddressingStyle = Literal["auto", "path", "virtual"]

# The error codes for "no such object"; a missing bucket is a real error.
_MISSING = frozenset({"NoSuchKey", "404"})

# An object key presigned once to learn how this client spells the bucket's URLs.
_PROBE_KEY = "fluxserve-url-probe"


class S3Storage:
    """Files in `bucket` under `prefix`; URLs are presigned GETs valid `url_lifetime` seconds.

    Credentials left unset come from boto3's usual chain (AWS_* variables,
    ~/.aws, an instance role). `endpoint_url` points at any S3-compatible server;
    most self-hosted ones (MinIO, Ceph, Garage) want `addressing_style="path"`.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        url_lifetime: int = MAX_URL_LIFETIME,
        addressing_style: AddressingStyle = "auto",
    ) -> None:
        if not 1 <= url_lifetime <= MAX_URL_LIFETIME:
            raise ValueError(
                f"url_lifetime must be 1 to {MAX_URL_LIFETIME} seconds (7 days, the most "
                f"a SigV4 presigned URL can live), not {url_lifetime}"
            )
        self.bucket = bucket
        self.prefix = f"{check_key(prefix.strip('/'))}/" if prefix.strip("/") else ""
        self.url_lifetime = url_lifetime
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            # boto3 >= 1.36 adds CRC checksums to every upload by default, which
            # several S3-compatible servers reject; send them only where required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of our own: boto3's default session is shared and not thread-safe.
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        # One PutObject replaces the object whole, so readers never see half a file.
        await asyncio.to_thread(
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._object_key(key),
            Body=data,
            ContentType=content_type,
        )

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, self._object_key(key))

    async def delete(self, key: str) -> None:
        # S3 answers a delete of a missing object with success too.
        await asyncio.to_thread(
            self._client.delete_object, Bucket=self.bucket, Key=self._object_key(key)
        )

    def url(self, key: str) -> str:
        # Presigning is local arithmetic (bar a rare credential refresh), and the port's
        # url() is synchronous, so it stays on the event loop.
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._object_key(key)},
            ExpiresIn=self.url_lifetime,
        )
        return url

    def key_for_url(self, url: str) -> str | None:
        # Any URL of an object under our prefix, presigned or not, however old:
        # the signature is not checked, since the key itself is the secret.
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        origin, folder = self._bucket_root
        if (parts.scheme.lower(), parts.netloc.lower()) != origin:
            return None
        if not parts.path.startswith(folder):
            return None
        object_key = unquote(parts.path.removeprefix(folder))
        if not object_key.startswith(self.prefix):
            return None
        return valid_key(object_key.removeprefix(self.prefix))

    @cached_property
    def _bucket_root(self) -> tuple[tuple[str, str], str]:
        """(scheme, host) and the path before an object key, as this client's URLs have them.

        Learnt from a presigned URL rather than rebuilt: botocore decides between
        path-style and virtual-hosted URLs from the endpoint, region and settings.
        """
        probe = urlsplit(
            self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": _PROBE_KEY}, ExpiresIn=60
            )
        )
        folder = probe.path.removesuffix(_PROBE_KEY)
        return (probe.scheme.lower(), probe.netloc.lower()), folder

    def _object_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _read(self, object_key: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise
        with response["Body"] as body:
            data: bytes = body.read()
        return data
