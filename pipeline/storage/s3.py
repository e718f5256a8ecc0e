"""S3-compatible object storage (AWS S3, SeaweedFS, MinIO, R2, GCS's S3 API) through boto3.

Why boto3 (see docs/storage.md): it is AWS's own client, the reference every S3-compatible
server tests against; its low-level client is documented as thread-safe, which the ingress needs
(it calls the store from worker threads); it reads the standard AWS environment and credential
chain (instance roles, web identity on Kubernetes); and it is already a dependency of most
Python images. The store is synchronous, like the local one: callers on an event loop use
`asyncio.to_thread`.
"""

from __future__ import annotations

import mimetypes
from contextlib import contextmanager
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
)

from pipeline.storage.objectstore import (
    ArtifactNotFound,
    ObjectStoreError,
    ObjectStoreUnavailable,
    check_key,
    check_prefix,
)
from pipeline.settings import S3Settings

_MISSING = {"404", "NoSuchKey", "NotFound"}
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
# Answers of a server that is there but failing for now (overloaded, restarting): an outage.
_UNAVAILABLE = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


class S3ObjectStore:
    """Objects under `s3://bucket/prefix/`. One boto3 client per store, shared by all threads."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        self.settings = settings or S3Settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint = self.settings.endpoint()
        try:
            credentials = self.settings.credentials()
        except ValueError as exc:
            raise ObjectStoreError(f"{self.url}: {exc}") from None
        config = Config(
            s3={"addressing_style": self.settings.addressing_style},
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=self.settings.max_connections,
            connect_timeout=5,
            read_timeout=60,
            # Checksums only where S3 requires them: several S3-compatible servers reject the
            # CRC trailers that newer boto3 versions send by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A Session is not thread-safe, a client is: build the client here, once.
        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=self.endpoint, region_name=self.settings.region_name(), config=config, **credentials
        )
        # The probe's own client: one attempt, short timeouts, so a ping of a server that is down
        # answers in about a second instead of after the data client's retries.
        self._probe = session.client(
            "s3", endpoint_url=self.endpoint, region_name=self.settings.region_name(), **credentials,
            config=config.merge(Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1, read_timeout=5)),
        )
        # Until the bucket has answered once, an unreachable server is most likely a wrong
        # endpoint; after that, the same error is an outage (see _errors).
        self._worked = False
        self._check_bucket()
        self._worked = True

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint or 'AWS S3'}"

    def _unavailable(self, action: str, reason: str) -> ObjectStoreError:
        """A server that cannot be reached: an outage once it has worked, else most likely the
        configuration (the message says which)."""
        where = self.endpoint or "AWS S3"
        if self._worked:
            return ObjectStoreUnavailable(
                f"{action} {self.url}: the S3 server at {where} stopped answering ({reason}); it worked "
                "before, so this is an outage, not a configuration problem"
            )
        return ObjectStoreError(
            f"{action} {self.url}: cannot reach {where} ({reason}); set pipeline.s3.endpoint_url "
            "(or AWS_ENDPOINT_URL_S3) to the S3 server, or start it"
        )

    @contextmanager
    def _errors(self, action: str, key: str | None = None):
        """boto3's errors, reworded to say what to set, or that the server is down for now
        (ObjectStoreUnavailable: callers wait and try again)."""
        try:
            yield
        except NoCredentialsError:
            raise ObjectStoreError(
                f"{action} {self.url}: no S3 credentials; set {self.settings.access_key_env} and "
                f"{self.settings.secret_key_env} (names from pipeline.s3.access_key_env / secret_key_env)"
            ) from None
        except EndpointConnectionError:
            raise self._unavailable(action, "connection refused") from None
        except (BotoConnectionError, HTTPClientError) as exc:  # timeouts, connections closed mid-answer
            raise self._unavailable(action, type(exc).__name__) from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING and key is not None:
                raise ArtifactNotFound(key) from None
            if code in _UNAVAILABLE or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
                raise self._unavailable(action, f"it answered {code}") from None
            if code == "NoSuchBucket":
                raise ObjectStoreError(f"{action} {self.url}: {self._where()} does not exist") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise ObjectStoreError(
                    f"{action} {self.url}: {self._where()} refused the credentials ({code}); check "
                    f"{self.settings.access_key_env} / {self.settings.secret_key_env} and the key's permissions"
                ) from None
            raise ObjectStoreError(f"{action} {self.url}: {exc}") from None
        except BotoCoreError as exc:
            raise ObjectStoreError(f"{action} {self.url}: {exc}") from None

    def _check_bucket(self) -> None:
        """Fail at start-up, naming the bucket, rather than on the first image of a generation."""
        with self._errors("opening"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
                    raise
        if not self.settings.create_bucket:
            raise ObjectStoreError(
                f"{self._where()} does not exist: create it, or set pipeline.s3.create_bucket: true"
            )
        with self._errors("creating the bucket of"):
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:  # another replica created it first
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _key(self, key: str) -> str:
        return self._base + check_key(key)

    def ping(self) -> None:
        """One HEAD of the bucket, one attempt: raises ObjectStoreUnavailable when the server is
        down, ObjectStoreError when it answers but refuses (credentials, a missing bucket)."""
        with self._errors("pinging"):
            self._probe.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        content_type = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        with self._errors("writing to", key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        return key

    def get(self, key: str) -> bytes:
        with self._errors("reading from", key):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._errors("checking", key):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ArtifactNotFound:
            return False
        return True

    def _objects(self, prefix: str):
        """(key relative to the store, size) of every object under the folder-like prefix."""
        prefix = check_prefix(prefix)
        full = self._base + prefix
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        with self._errors("listing"):
            for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"]
                    if not prefix or name == full or name.startswith(full + "/"):
                        yield name[len(self._base):], item["Size"]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(key for key, _ in self._objects(prefix))

    def delete_prefix(self, prefix: str) -> int:
        if not check_prefix(prefix):
            raise ValueError("refusing to delete the whole store: give a prefix")
        keys = self.list(prefix)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self._base + key} for key in keys[start : start + _DELETE_BATCH]]
            with self._errors("deleting from"):
                answer = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ObjectStoreError(
                    f"deleting from {self.url}: {len(answer['Errors'])} objects not deleted, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def link(self, src_key: str, dst_key: str) -> None:
        """S3 has no links: a server-side copy (the bytes do not travel through this process,
        but the bucket stores them twice). TraceWriter avoids this for trace images with a
        small pointer object instead, see pipeline/traces.py."""
        with self._errors("copying in", src_key):
            self._client.copy_object(
                Bucket=self.bucket, Key=self._key(dst_key), CopySource={"Bucket": self.bucket, "Key": self._key(src_key)}
            )

    def stored_bytes(self, prefix: str = "", seen: set | None = None) -> int:
        return sum(size for _, size in self._objects(prefix))

    def folders(self) -> list[str]:
        """The top-level names (one per generation): S3's common prefixes, a LIST page per
        1000 generations rather than one per 1000 objects (retention's orphan sweep)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._base, Delimiter="/")
        with self._errors("listing"):
            return sorted(item["Prefix"][len(self._base):].rstrip("/") for page in pages for item in page.get("CommonPrefixes", ()))

    def newest(self, prefix: str) -> datetime | None:
        """When anything under the folder-like prefix was last written; None when nothing is."""
        full = self._base + check_prefix(prefix) + "/"
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        with self._errors("listing"):
            times = [item["LastModified"] for page in pages for item in page.get("Contents", ())]
        return max(times) if times else None
