"""Where result and uploaded files live; see `base.Storage`, and `open_storage`."""

from __future__ import annotations

from fluxserve.errors import ConfigError
from fluxserve.settings import Settings
from fluxserve.storage.base import Storage, check_key
from fluxserve.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "check_key", "open_storage"]


def open_storage(settings: Settings) -> Storage:
    """The storage `settings` choose: the local folder (default) or an S3 bucket."""
    if settings.storage == "local":
        return LocalStorage(settings.files_dir, settings.base_url)
    if not settings.s3_bucket:
        raise ConfigError("storage = 's3' needs s3_bucket (FLUXSERVE_S3_BUCKET)")
    secret = settings.s3_secret_access_key
    if (settings.s3_access_key_id is None) != (secret is None):
        raise ConfigError(
            "s3_access_key_id and s3_secret_access_key go together: set both, or neither "
            "to use boto3's own credentials (AWS_* variables, ~/.aws, an instance role)"
        )
    # Imported here, not above: boto3 is the optional extra fluxserve[s3].
    from fluxserve.storage.s3 import S3Storage

    return S3Storage(
        settings.s3_bucket,
        prefix=settings.s3_prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret else None,
        url_lifetime=settings.s3_url_lifetime,
        addressing_style=settings.s3_addressing_style,
    )
