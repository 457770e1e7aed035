"""Where the off-site copy goes, without importing boto3.

boto3 takes a noticeable fraction of a second to import; settings, dry runs and local
backups need only this description of the destination, so they never pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlwarden.catalog import MANIFEST, Manifest

ARCHIVE_STORAGE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")  # objects that need a restore request before a download
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", *ARCHIVE_STORAGE_CLASSES)


class OffsiteError(RuntimeError):
    """The off-site copy could not be made, checked or read."""


class ObjectArchived(OffsiteError):
    """The object is in an archive storage class: it needs a restore request, not a retry."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    storage_class: str = "STANDARD"
    chunk_size: int = 64 * 2**20
    concurrency: int = 8
    attempts: int = 3
    retry_base_seconds: float = 2.0

    def key(self, name: str, file_name: str) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/{name}/{file_name}" if prefix else f"{name}/{file_name}"

    def copy_key(self, manifest: Manifest) -> str:
        """The key that stands for a backup's off-site copy: its archive's, or its manifest's
        for a backup with no archive of its own."""
        return self.key(manifest.name, manifest.archive if manifest.has_archive else MANIFEST)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}"
