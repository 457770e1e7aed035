"""The off-site copy: backups in an S3 bucket (AWS or any S3-compatible store).

Layout: ``s3://BUCKET/PREFIX/<name>/<file>`` for the archive, its ``.sha256``,
``SHA256SUMS`` and ``manifest.json``; the manifest goes last, so in S3 too a backup without
its manifest does not exist. The archive goes up with boto3's managed multipart transfer,
its full SHA-256 as object metadata (``x-amz-meta-sha256``); after the upload ``head_object``
must show that hash and the archive's size, which works the same for GLACIER and
DEEP_ARCHIVE objects, where a download to check would take hours and cost money.

Credentials come the standard boto3 way (environment, shared config, instance role), never
from flags. Retries are counted once: botocore (standard mode) tries each request up to
``attempts`` times; :func:`with_retries` tries the whole operation again only when its
own check failed (a hash or size that does not match), which no request retry can mend.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from mlwarden.backoff import Backoff
from mlwarden.jobs.backup.s3config import ARCHIVE_STORAGE_CLASSES, ObjectArchived, OffsiteError, S3Location
from mlwarden.catalog import CHECKSUMS, MANIFEST, BackupEntry, CatalogError, Manifest, OffsiteCopy

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
MAX_RETRY_SECONDS = 300.0
_S3_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)


def with_retries(what: str, attempts: int, base_seconds: float, action: Callable[[], T]) -> T:
    """Run ``action``; after a failed check (OffsiteError) run it again, with backoff; S3 errors raise at once.

    An S3 error arrives here after botocore has already tried the request ``attempts``
    times: trying the whole operation again would multiply the attempts.
    """
    policy = Backoff(initial=base_seconds, maximum=MAX_RETRY_SECONDS)
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except ObjectArchived:
            raise
        except _S3_ERRORS as exc:
            raise OffsiteError(f"{what} failed: {exc}") from None
        except OffsiteError as exc:
            if attempt == attempts:
                raise OffsiteError(f"{what} failed after {attempts} attempt(s): {exc}") from None
            delay = policy.delay(attempt)
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.1fs", what, attempt, attempts, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class OffsiteStore:
    def __init__(self, location: S3Location) -> None:
        self.location = location
        config = botocore.config.Config(
            # total_max_attempts counts the first try; botocore's "max_attempts" counts only retries.
            retries={"mode": "standard", "total_max_attempts": location.attempts},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max(10, location.concurrency),
        )
        self._s3: Any = boto3.session.Session().client("s3", endpoint_url=location.endpoint_url, config=config)

    def _transfer_config(self, size: int) -> TransferConfig:
        # Grow the part size for huge archives so that they stay under S3's 10,000 parts.
        chunk = max(self.location.chunk_size, -(-size // _MAX_PARTS))
        return TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=self.location.concurrency,
            use_threads=True,
        )

    def upload(self, entry: BackupEntry) -> OffsiteCopy:
        """Copy one backup (archive first, manifest last) and check the archive's hash in S3."""
        loc = self.location
        manifest = entry.manifest
        archive_key = loc.key(entry.name, manifest.archive)

        def copy() -> None:
            self._s3.upload_file(
                str(entry.archive_path),
                loc.bucket,
                archive_key,
                ExtraArgs={"Metadata": {"sha256": manifest.archive_sha256}, "StorageClass": loc.storage_class},
                Config=self._transfer_config(manifest.archive_bytes),
            )
            self._check_archive(archive_key, manifest)
            for file_name in (manifest.archive + ".sha256", CHECKSUMS, MANIFEST):
                self._s3.put_object(
                    Bucket=loc.bucket,
                    Key=loc.key(entry.name, file_name),
                    Body=(entry.directory / file_name).read_bytes(),
                )

        started = time.monotonic()
        with_retries(f"upload of {entry.name} to {loc.url}", loc.attempts, loc.retry_base_seconds, copy)
        log.info("uploaded %s to s3://%s/%s in %.1fs, SHA-256 checked", entry.name, loc.bucket, archive_key, time.monotonic() - started)
        return OffsiteCopy(
            uploaded_at=time.time(),
            bucket=loc.bucket,
            key=archive_key,
            sha256=manifest.archive_sha256,
            storage_class=loc.storage_class,
            verified=True,
        )

    def _check_archive(self, key: str, manifest: Manifest) -> None:
        head = self._s3.head_object(Bucket=self.location.bucket, Key=key)
        stored = head.get("Metadata", {}).get("sha256")
        if stored != manifest.archive_sha256 or head.get("ContentLength") != manifest.archive_bytes:
            raise OffsiteError(f"s3://{self.location.bucket}/{key} does not match the local archive (hash or size)")

    def manifests(self) -> list[Manifest]:
        """The committed backups in the bucket (those whose manifest was uploaded), oldest first."""
        loc = self.location
        prefix = loc.prefix.strip("/") + "/" if loc.prefix.strip("/") else ""

        def listing() -> list[Manifest]:
            found = []
            paginator = self._s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/" + MANIFEST) and obj["Key"].count("/") == prefix.count("/") + 1:
                        body = self._s3.get_object(Bucket=loc.bucket, Key=obj["Key"])["Body"].read()
                        found.append(Manifest.from_dict(json.loads(body)))
            return sorted(found, key=lambda m: (m.started_at, m.name))

        return with_retries(f"listing of {loc.url}", loc.attempts, loc.retry_base_seconds, listing)

    def manifest(self, name: str) -> Manifest:
        if name == "latest":
            found = self.manifests()
            if not found:
                raise CatalogError(f"no backups in {self.location.url}")
            return found[-1]
        loc = self.location

        def fetch() -> Manifest:
            body = self._s3.get_object(Bucket=loc.bucket, Key=loc.key(name, MANIFEST))["Body"].read()
            return Manifest.from_dict(json.loads(body))

        return with_retries(f"download of the manifest of {name}", loc.attempts, loc.retry_base_seconds, fetch)

    def download(self, manifest: Manifest, directory: Path) -> None:
        """Download a backup's files into ``directory`` (archive, checksums, manifest)."""
        loc = self.location
        archive_key = loc.key(manifest.name, manifest.archive)

        def fetch() -> None:
            head = self._s3.head_object(Bucket=loc.bucket, Key=archive_key)
            if head.get("StorageClass") in ARCHIVE_STORAGE_CLASSES and 'ongoing-request="false"' not in head.get("Restore", ""):
                raise ObjectArchived(
                    f"s3://{loc.bucket}/{archive_key} is in {head['StorageClass']}: request a restore first "
                    "(aws s3api restore-object), wait for it, then run the restore again"
                )
            self._s3.download_file(loc.bucket, archive_key, str(directory / manifest.archive), Config=self._transfer_config(manifest.archive_bytes))
            for file_name in (manifest.archive + ".sha256", CHECKSUMS, MANIFEST):
                self._s3.download_file(loc.bucket, loc.key(manifest.name, file_name), str(directory / file_name))

        with_retries(f"download of {manifest.name} from {loc.url}", loc.attempts, loc.retry_base_seconds, fetch)

    def delete(self, name: str) -> None:
        """Delete one backup from the bucket, manifest first (so a half-deleted one is not a backup)."""
        loc = self.location

        def remove() -> None:
            prefix = loc.key(name, "")
            keys = [o["Key"] for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix) for o in page.get("Contents", [])]
            manifest_key = loc.key(name, MANIFEST)
            if manifest_key in keys:
                self._s3.delete_object(Bucket=loc.bucket, Key=manifest_key)
            for key in keys:
                if key != manifest_key:
                    self._s3.delete_object(Bucket=loc.bucket, Key=key)

        with_retries(f"deletion of {name} from {loc.url}", loc.attempts, loc.retry_base_seconds, remove)
