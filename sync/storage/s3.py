"""``s3``: any S3-compatible object store (AWS S3, MinIO, Ceph RGW, …) through boto3.

Blobs larger than ``part_mb`` go up as a multipart upload (aborted on any failure); smaller
ones as one PUT carrying its SHA-256 so the store itself checks the bytes. Blob and entry
writes use ``If-None-Match: *`` so that servers sharing a bucket never overwrite each
other; with ``conditional_writes = false`` (stores that lack it) a HEAD comes first, which
is safe here because a blob's key is its hash. Credentials come from the options or the
usual AWS chain (environment, profile, instance role).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field, SecretStr

from ..errors import StorageError
from . import register
from .base import Storage, StorageOptions, blob_key

_MIB = 1 << 20


class S3Options(StorageOptions):
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = Field(default="", description="key prefix, e.g. 'edgecap/'")
    endpoint_url: str | None = Field(default=None, description="e.g. http://minio:9000")
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    part_mb: int = Field(default=16, ge=5, le=5120, description="multipart part size")
    conditional_writes: bool = True
    request_checksum: Literal["when_supported", "when_required"] = "when_supported"
    create_bucket: bool = Field(default=False, description="create the bucket if missing")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=20)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


@register("s3")
class S3Storage(Storage):
    Options = S3Options
    options: S3Options

    def __init__(self, options: S3Options):
        super().__init__(options)
        import boto3
        import botocore.config
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self._ClientError = ClientError
        o = options
        session = boto3.session.Session(
            profile_name=o.profile, region_name=o.region,
            aws_access_key_id=o.access_key_id,
            aws_secret_access_key=(o.secret_access_key.get_secret_value()
                                   if o.secret_access_key else None))
        cfg = botocore.config.Config(
            connect_timeout=o.connect_timeout_s, read_timeout=o.read_timeout_s,
            retries={"max_attempts": o.max_attempts, "mode": "standard"},
            request_checksum_calculation=o.request_checksum,
            response_checksum_validation=o.request_checksum)
        self.s3 = session.client("s3", endpoint_url=o.endpoint_url, config=cfg)
        self.bucket = o.bucket
        self.prefix = o.prefix
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchBucket") and o.create_bucket:
                self._call(self.s3.create_bucket, Bucket=self.bucket)
            else:
                raise StorageError(f"bucket {self.bucket!r}: {_code(e) or e}") from None
        except BotoCoreError as e:
            raise StorageError(f"cannot reach {o.endpoint_url or 'S3'}: {e}") from None

    def describe(self) -> str:
        where = self.options.endpoint_url or "aws"
        return f"s3://{self.bucket}/{self.prefix} ({where})"

    def _call(self, fn: Any, **kw: Any) -> Any:
        try:
            return fn(**kw)
        except self._errors as e:
            raise StorageError(f"s3 {fn.__name__}: {_code(e) or e}") from None

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except self._ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"s3 head {key}: {_code(e) or e}") from None
        except self._errors as e:
            raise StorageError(f"s3 head {key}: {e}") from None

    def _cond(self) -> dict[str, str]:
        return {"IfNoneMatch": "*"} if self.options.conditional_writes else {}

    def _precondition_failed(self, e: Exception) -> bool:
        return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")

    # -- blobs ---------------------------------------------------------------------------
    def has_blob(self, sha256: str) -> bool:
        return self._exists(blob_key(sha256))

    def put_blob(self, sha256: str, src: Path, size: int) -> bool:
        key = self._k(blob_key(sha256))
        if self.has_blob(sha256):
            return False
        part = self.options.part_mb * _MIB
        try:
            if size <= part:
                with open(src, "rb") as f:
                    self.s3.put_object(
                        Bucket=self.bucket, Key=key, Body=f.read(),
                        ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
                        **self._cond())
            else:
                self._multipart(key, src, part)
        except self._ClientError as e:
            if self._precondition_failed(e):
                return False
            raise StorageError(f"s3 put blob {sha256[:12]}: {_code(e) or e}") from None
        except self._errors as e:
            raise StorageError(f"s3 put blob {sha256[:12]}: {e}") from None
        except OSError as e:
            raise StorageError(f"cannot read staged blob {src}: {e.strerror}") from None
        head = self._call(self.s3.head_object, Bucket=self.bucket, Key=key)
        if head.get("ContentLength") != size:
            raise StorageError(f"s3 blob {sha256[:12]} has {head.get('ContentLength')} "
                               f"bytes, expected {size}")
        return True

    def _multipart(self, key: str, src: Path, part: int) -> None:
        up = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = up["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            with open(src, "rb") as f:
                n = 1
                while data := f.read(part):
                    r = self.s3.upload_part(Bucket=self.bucket, Key=key, PartNumber=n,
                                            UploadId=upload_id, Body=data)
                    parts.append({"PartNumber": n, "ETag": r["ETag"],
                                  **{k: v for k, v in r.items()
                                     if k.startswith("Checksum") and k != "ChecksumType"}})
                    n += 1
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key,
                                              UploadId=upload_id,
                                              MultipartUpload={"Parts": parts},
                                              **self._cond())
        except BaseException:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                               UploadId=upload_id)
            except Exception:  # the upload may already be complete or gone
                pass
            raise

    def read_blob(self, sha256: str) -> Iterator[bytes]:
        r = self._call(self.s3.get_object, Bucket=self.bucket, Key=self._k(blob_key(sha256)))
        try:
            yield from r["Body"].iter_chunks(4 * _MIB)
        except self._errors as e:
            raise StorageError(f"s3 read blob {sha256[:12]}: {e}") from None

    def list_blobs(self) -> Iterator[str]:
        for key in self.list_keys("blobs/"):
            yield key.rsplit("/", 1)[-1]

    # -- small objects -------------------------------------------------------------------
    def get_object(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self._ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"s3 get {key}: {_code(e) or e}") from None
        except self._errors as e:
            raise StorageError(f"s3 get {key}: {e}") from None

    def put_object(self, key: str, data: bytes) -> None:
        self._call(self.s3.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)

    def put_object_if_absent(self, key: str, data: bytes) -> bool:
        if not self.options.conditional_writes and self._exists(key):
            return False
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data,
                               **self._cond())
            return True
        except self._ClientError as e:
            if self._precondition_failed(e):
                return False
            raise StorageError(f"s3 put {key}: {_code(e) or e}") from None
        except self._errors as e:
            raise StorageError(f"s3 put {key}: {e}") from None

    def list_keys(self, prefix: str) -> Iterator[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._k(prefix))
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix):]
        except self._errors as e:
            raise StorageError(f"s3 list {prefix}: {e}") from None

    def close(self) -> None:
        self.s3.close()
