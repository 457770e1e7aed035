"""The off-site copy: backups in an S3 bucket (AWS or any S3-compatible store).

Layout: ``s3://BUCKET/PREFIX/<name>/<file>`` for the archive, its ``.sha256``,
``SHA256SUMS`` and ``manifest.json``; the manifest goes last, so in S3 too a backup without
its manifest does not exist. A backup that stored nothing new has only ``SHA256SUMS`` and
its manifest there, uploaded once every pack it names is known to be in the bucket. An archive smaller than the part size goes up in one PUT, a
larger one with boto3's managed multipart transfer (loaded only then); every part carries
S3's own SHA-256 checksum (``ChecksumAlgorithm``: S3 rejects a part whose bytes do not
match), the object its full SHA-256 as metadata (``x-amz-meta-sha256``). After the
upload, what S3 computed from the bytes it stored must match what is computed locally from
the archive, part by part the same way: the SHA-256 checksum (``ChecksumMode``; for a
multipart object the SHA-256 of the parts' SHA-256s) and the ETag (MD5, or for multipart the
MD5 of the parts' MD5s and ``-N``; not compared for SSE-KMS and SSE-C objects, whose ETag is
no MD5), and the size. This works the same for GLACIER and DEEP_ARCHIVE objects, where a
download to check would take hours and cost money.

Credentials come the standard boto3 way (environment, shared config, instance role), never
from flags. Retries are counted once: botocore (standard mode) tries each request up to
``attempts`` times; :func:`with_retries` tries the whole operation again only when its
own check failed (a hash or size that does not match), which no request retry can mend.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.config  # type: ignore[import-untyped]  # boto3, botocore and s3transfer ship no type hints
import botocore.exceptions  # type: ignore[import-untyped]  # as above
import botocore.loaders  # type: ignore[import-untyped]  # as above
import botocore.session  # type: ignore[import-untyped]  # as above
from mlwarden.jobs.backup.s3config import ARCHIVE_STORAGE_CLASSES, ObjectArchived, OffsiteError, S3Location

from mlwarden import jsonio
from mlwarden.backoff import Backoff
from mlwarden.catalog import CHECKSUMS, MANIFEST, PACK, BackupEntry, Catalog, CatalogError, Manifest, OffsiteCopy, Pack, check_backup_name
from mlwarden.fsutil import atomic_write_text

if TYPE_CHECKING:
    from boto3.s3.transfer import S3Transfer  # type: ignore[import-untyped]  # no type hints

log = logging.getLogger(__name__)

T = TypeVar("T")
_NamedT = TypeVar("_NamedT", Manifest, Pack)
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
_READ_BYTES = 8 * 2**20
_ETAG_NOT_MD5 = ("aws:kms", "aws:kms:dsse")  # server-side encryption whose ETag is not the MD5 of the bytes
MAX_RETRY_SECONDS = 300.0


class TransferFailed(Exception):
    """boto3's managed transfer gave up (after botocore's retries): an S3 error, like botocore's own."""


_S3_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, TransferFailed)


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


@dataclass(frozen=True)
class ObjectChecksums:
    sha256: str  # base64, as S3 returns it: of the bytes, or of the parts' SHA-256s (multipart)
    etag: str  # hex MD5 of the bytes, or MD5 of the parts' MD5s and "-N" (multipart)


def object_checksums(path: Path, part_size: int | None) -> ObjectChecksums:
    """What S3 computes for ``path`` uploaded in one PUT (``part_size`` None) or in parts."""
    part_sha: list[bytes] = []
    part_md5: list[bytes] = []
    with open(path, "rb", buffering=0) as handle:
        while True:
            sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
            read = 0
            while part_size is None or read < part_size:
                chunk = handle.read(_READ_BYTES if part_size is None else min(_READ_BYTES, part_size - read))
                if not chunk:
                    break
                sha.update(chunk)
                md5.update(chunk)
                read += len(chunk)
            if part_size is None:
                return ObjectChecksums(base64.b64encode(sha.digest()).decode(), md5.hexdigest())
            if not read:
                break
            part_sha.append(sha.digest())
            part_md5.append(md5.digest())
    composite_sha = hashlib.sha256(b"".join(part_sha)).digest()
    composite_md5 = hashlib.md5(b"".join(part_md5), usedforsecurity=False).hexdigest()
    return ObjectChecksums(base64.b64encode(composite_sha).decode(), f"{composite_md5}-{len(part_md5)}")


class _JSONFiles(botocore.loaders.JSONFileLoader):  # type: ignore[misc]  # an untyped base class
    """botocore's model files as plain dicts: its own loader builds an OrderedDict of every
    object (``object_pairs_hook``), which made loading S3's model and the endpoint tables a
    third of a small backup's S3 set-up. Dicts keep their order too. Parsed by orjson (the
    relay's decoder, with the standard library's as its fallback): 3.3 MB of JSON in a cold
    process, about 34 ms instead of 48."""

    def load_file(self, file_path: str) -> Any:
        for extension, opener in ((".json", open), (".json.gz", gzip.open)):
            try:
                with opener(file_path + extension, "rb") as handle:
                    return jsonio.decode(handle.read())
            except FileNotFoundError:
                continue
        return None


class _S3Models(botocore.loaders.Loader):  # type: ignore[misc]  # an untyped base class
    """botocore's data loader, told that S3 is the service there is: its own lists every
    service's directory (hundreds) to check the name, twice per client."""

    def list_available_services(self, type_name: str) -> list[str]:
        return ["s3"]


def s3_client(location: S3Location, config: botocore.config.Config) -> Any:
    """An S3 client made by botocore directly (credentials, region and settings found as boto3
    finds them): boto3's session layer and its transfer manager load only for a transfer that
    needs them (:meth:`OffsiteStore._transferred`)."""
    session = botocore.session.get_session()
    data_path = session.get_config_variable("data_path")  # AWS_DATA_PATH, honoured as botocore does
    extra = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else []
    session.register_component("data_loader", _S3Models(extra_search_paths=extra, file_loader=_JSONFiles()))
    return session.create_client("s3", endpoint_url=location.endpoint_url, config=config)


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
        self._s3: Any = s3_client(location, config)

    def _chunk(self, size: int) -> int:
        # Grow the part size for huge archives so that they stay under S3's 10,000 parts.
        return max(self.location.chunk_size, -(-size // _MAX_PARTS))

    def _part_size(self, size: int) -> int | None:
        """The part size the transfer will use for ``size`` bytes; None for a single PUT."""
        chunk = self._chunk(size)
        if size < chunk:
            return None
        from s3transfer.utils import ChunksizeAdjuster  # type: ignore[import-untyped]  # no type hints

        return int(ChunksizeAdjuster().adjust_chunksize(chunk, size))

    def _transferred(self, size: int, action: Callable[[S3Transfer], object]) -> None:
        """Run ``action`` with boto3's managed transfer (multipart and parallel above the part
        size) for an object of ``size`` bytes; its failures are S3 errors (:data:`_S3_ERRORS`)."""
        from boto3.exceptions import Boto3Error  # type: ignore[import-untyped]  # no type hints
        from boto3.s3.transfer import S3Transfer, TransferConfig

        chunk = self._chunk(size)
        config = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=self.location.concurrency, use_threads=True)
        try:
            with S3Transfer(self._s3, config) as transfer:
                action(transfer)
        except Boto3Error as exc:
            raise TransferFailed(str(exc)) from None

    def _download(self, key: str, path: Path, size: int = 0) -> None:
        self._transferred(size, lambda transfer: transfer.download_file(self.location.bucket, key, str(path)))

    def upload(self, entry: BackupEntry) -> OffsiteCopy:
        """Copy one backup (archive first, manifest last) and check the archive's hash in S3.

        Format 3: the backup's own pack (if it has one), and any pack it names that the
        bucket lacks (an earlier copy failed, or S3 was configured later), so that in the
        bucket too the backup is complete before its manifest appears."""
        loc = self.location
        manifest = entry.manifest
        started = time.monotonic()
        if manifest.format_version >= 3:
            for name in manifest.packs:
                if name != entry.name and not self._has_pack(name):
                    log.info("pack %s, which %s needs, is not in %s: uploading it", name, entry.name, loc.url)
                    try:
                        pack = Catalog.read_pack(entry.directory.parent / name)
                    except (OSError, CatalogError) as exc:
                        raise OffsiteError(f"{entry.name} needs pack {name}, which is neither in {loc.url} nor readable here: {exc}") from None
                    self._copy(pack, (pack.manifest.archive + ".sha256", PACK))
        if manifest.has_archive:
            extra = (PACK,) if entry.pack is not None else ()
            key = self._copy(entry, (manifest.archive + ".sha256", *extra, CHECKSUMS, MANIFEST))
            sha256 = manifest.archive_sha256
        else:  # nothing new: every pack it names is in the bucket (checked above), its index goes up
            key = loc.copy_key(manifest)
            index = (CHECKSUMS, MANIFEST)
            with_retries(f"upload of {entry.name} to {loc.url}", loc.attempts, loc.retry_base_seconds, lambda: self._put_files(entry, index))
            sha256 = hashlib.sha256((entry.directory / MANIFEST).read_bytes()).hexdigest()
        seconds = time.monotonic() - started
        log.info("uploaded %s to s3://%s/%s in %.1fs, checked by S3's SHA-256 and ETag", entry.name, loc.bucket, key, seconds)
        return OffsiteCopy(uploaded_at=time.time(), bucket=loc.bucket, key=key, sha256=sha256, storage_class=loc.storage_class, verified=True)

    def _copy(self, entry: BackupEntry, file_names: tuple[str, ...]) -> str:
        """Upload ``entry``'s archive, check it as S3 stored it, then ``file_names`` in order (the commit marker last)."""
        loc = self.location
        manifest = entry.manifest
        archive_key = loc.key(entry.name, manifest.archive)

        def copy() -> None:
            extra = {"Metadata": {"sha256": manifest.archive_sha256}, "StorageClass": loc.storage_class, "ChecksumAlgorithm": "SHA256"}
            if part_size is None:  # the one PUT the transfer manager would send, without loading it
                with open(entry.archive_path, "rb") as body:
                    self._s3.put_object(Bucket=loc.bucket, Key=archive_key, Body=body, **extra)
            else:
                self._transferred(
                    manifest.archive_bytes, lambda transfer: transfer.upload_file(str(entry.archive_path), loc.bucket, archive_key, extra_args=extra)
                )
            self._check_archive(archive_key, manifest, expected)
            self._put_files(entry, file_names)

        part_size = self._part_size(manifest.archive_bytes)
        expected = object_checksums(entry.archive_path, part_size)
        with_retries(f"upload of {entry.name} to {loc.url}", loc.attempts, loc.retry_base_seconds, copy)
        return archive_key

    def _put_files(self, entry: BackupEntry, file_names: tuple[str, ...]) -> None:
        """Upload ``file_names`` of ``entry``'s directory in order, each checked by S3 against its SHA-256."""
        for file_name in file_names:
            self._s3.put_object(
                Bucket=self.location.bucket,
                Key=self.location.key(entry.name, file_name),
                Body=(entry.directory / file_name).read_bytes(),
                ChecksumAlgorithm="SHA256",
            )

    def _has_pack(self, name: str) -> bool:
        """Whether the bucket holds pack ``name``: its pack.json goes up only after its archive was checked."""
        try:
            self._s3.head_object(Bucket=self.location.bucket, Key=self.location.key(check_backup_name(name), PACK))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            if code in ("403", "AccessDenied", "Forbidden"):
                # S3 answers a HEAD of a missing key with 403, not 404, to credentials without
                # s3:ListBucket (a least-privilege policy). Taken as missing, the pack goes up again
                # (same bytes); if reading is denied too, the check after the upload says so.
                log.info("S3 answered 403 for pack %s in %s (no s3:ListBucket?): uploading it", name, self.location.url)
                return False
            raise OffsiteError(f"cannot look for pack {name} in {self.location.url}: {exc}") from None
        except _S3_ERRORS as exc:
            raise OffsiteError(f"cannot look for pack {name} in {self.location.url}: {exc}") from None
        return True

    def _check_archive(self, key: str, manifest: Manifest, expected: ObjectChecksums) -> None:
        """What S3 computed from the bytes it stored must match the local archive."""
        url = f"s3://{self.location.bucket}/{key}"
        head = self._s3.head_object(Bucket=self.location.bucket, Key=key, ChecksumMode="ENABLED")
        if head.get("Metadata", {}).get("sha256") != manifest.archive_sha256 or head.get("ContentLength") != manifest.archive_bytes:
            raise OffsiteError(f"{url} does not match the local archive (hash metadata or size)")
        checksum = head.get("ChecksumSHA256")
        if checksum is not None and checksum.split("-")[0] != expected.sha256:
            raise OffsiteError(f"{url} is damaged: S3's SHA-256 checksum {checksum} is not the local archive's {expected.sha256}")
        etag_is_md5 = head.get("ServerSideEncryption") not in _ETAG_NOT_MD5 and "SSECustomerAlgorithm" not in head
        if etag_is_md5 and head.get("ETag", "").strip('"') != expected.etag:
            raise OffsiteError(f"{url} is damaged: its ETag {head.get('ETag')} is not the local archive's \"{expected.etag}\"")
        if checksum is None and not etag_is_md5:
            raise OffsiteError(f"{url}: S3 returned neither a SHA-256 checksum nor an MD5 ETag to check the upload against")

    def manifests(self, problems: list[str] | None = None) -> list[Manifest]:
        """The committed backups in the bucket (those whose manifest was uploaded), oldest first.

        A manifest that is not one of ours (bad JSON, a name that is not a backup's, an
        archive name other than the backup's own, a name other than its key's) is logged
        and left out: anyone who can write to the prefix can put one there."""
        loc = self.location
        prefix = loc.prefix.strip("/") + "/" if loc.prefix.strip("/") else ""

        def listing() -> list[Manifest]:
            found = []
            paginator = self._s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/" + MANIFEST) and obj["Key"].count("/") == prefix.count("/") + 1:
                        try:
                            found.append(self._read_manifest(obj["Key"][len(prefix) : -len("/" + MANIFEST)]))
                        except CatalogError as exc:
                            log.error("ignoring s3://%s/%s: %s", loc.bucket, obj["Key"], exc)
                            if problems is not None:
                                problems.append(str(exc))
            return sorted(found, key=lambda m: (m.started_at, m.name))

        return with_retries(f"listing of {loc.url}", loc.attempts, loc.retry_base_seconds, listing)

    def manifest(self, name: str) -> Manifest:
        if name == "latest":
            found = self.manifests()
            if not found:
                raise CatalogError(f"no backups in {self.location.url}")
            return found[-1]
        loc = self.location
        check_backup_name(name)
        return with_retries(f"download of the manifest of {name}", loc.attempts, loc.retry_base_seconds, lambda: self._read_manifest(name))

    def _read_manifest(self, name: str) -> Manifest:
        """The manifest stored under backup ``name``'s key, validated (CatalogError otherwise)."""
        return self._read_named(name, MANIFEST, Manifest.from_json)

    def _read_pack(self, name: str) -> Pack:
        """The pack.json stored under pack ``name``'s key, validated (CatalogError otherwise)."""
        return self._read_named(name, PACK, Pack.from_json)

    def _read_named(self, name: str, file_name: str, parse: Callable[[bytes, str], _NamedT]) -> _NamedT:
        """Anyone who can write to the prefix can put a file there: it must parse and name its own key."""
        key = self.location.key(check_backup_name(name), file_name)
        body = self._s3.get_object(Bucket=self.location.bucket, Key=key)["Body"].read()
        parsed = parse(body, f"s3://{self.location.bucket}/{key}")
        if parsed.name != name:
            raise CatalogError(f"s3://{self.location.bucket}/{key} names another backup, {parsed.name!r}")
        return parsed

    def download(self, manifest: Manifest, directory: Path) -> Path:
        """Download a backup into ``directory``, a private staging directory laid out as a
        backup directory: ``<name>/`` with its archive, checksums and the manifest (as already
        read and validated, not downloaded again), and for format 3 ``<pack>/`` for each
        other pack it names, nothing else. Only names the validation of the manifest and of
        each ``pack.json`` allows become paths; every archive's hash is checked by the
        restore before anything is extracted. Returns the backup's directory."""
        loc = self.location
        own = directory / manifest.name

        def fetch() -> None:
            own.mkdir(exist_ok=True)
            if manifest.format_version < 3:
                self._fetch_archive(manifest.name, manifest.archive, manifest.archive_bytes, own)
            for name in manifest.packs:
                pack = self._read_pack(name)
                place = own if name == manifest.name else directory / name
                place.mkdir(exist_ok=True)
                self._fetch_archive(name, pack.archive, pack.archive_bytes, place)
                atomic_write_text(place / PACK, pack.to_json())
            self._download(loc.key(manifest.name, CHECKSUMS), own / CHECKSUMS)
            atomic_write_text(own / MANIFEST, manifest.to_json())

        with_retries(f"download of {manifest.name} from {loc.url}", loc.attempts, loc.retry_base_seconds, fetch)
        return own

    def _fetch_archive(self, name: str, archive: str, size: int, place: Path) -> None:
        loc = self.location
        archive_key = loc.key(name, archive)
        head = self._s3.head_object(Bucket=loc.bucket, Key=archive_key)
        if head.get("StorageClass") in ARCHIVE_STORAGE_CLASSES and 'ongoing-request="false"' not in head.get("Restore", ""):
            raise ObjectArchived(
                f"s3://{loc.bucket}/{archive_key} is in {head['StorageClass']}: request a restore first "
                "(aws s3api restore-object), wait for it, then run the restore again"
            )
        self._download(archive_key, place / archive, size)
        self._download(loc.key(name, archive + ".sha256"), place / (archive + ".sha256"))

    def prune(self, doomed: list[Manifest]) -> None:
        """Delete backups from the bucket without taking content a kept one needs: each
        manifest first (so a half-deleted backup is not a backup); a format-2 backup's
        objects at once; format-3 packs only once no manifest left in the bucket names them."""
        for manifest in doomed:
            if manifest.format_version < 3:
                self.delete(manifest.name)
            else:
                self._delete_keys([self.location.key(manifest.name, MANIFEST), self.location.key(manifest.name, CHECKSUMS)])
        self.collect_garbage()

    def collect_garbage(self) -> list[str]:
        """Delete the packs (``<name>/`` with pack.json and no manifest) that no manifest in the
        bucket names; nothing while any manifest there cannot be read (it might name one)."""
        loc = self.location
        problems: list[str] = []
        referenced = {name for manifest in self.manifests(problems) for name in manifest.packs}
        if problems:
            log.warning("not deleting unreferenced packs from %s: %d manifest(s) there cannot be read", loc.url, len(problems))
            return []
        deleted = []
        for name, keys in sorted(self._groups().items()):
            if loc.key(name, PACK) in keys and loc.key(name, MANIFEST) not in keys and name not in referenced:
                log.info("deleting pack %s from %s: no backup there names it any more", name, loc.url)
                pack_key = loc.key(name, PACK)
                # pack.json last: a deletion cut short leaves a pack the next one finds again.
                self._delete_keys([key for key in keys if key != pack_key] + [pack_key])
                deleted.append(name)
        return deleted

    def _groups(self) -> dict[str, list[str]]:
        """Keys under the prefix by backup name (keys under other names are not ours: left out)."""
        loc = self.location
        prefix = loc.prefix.strip("/") + "/" if loc.prefix.strip("/") else ""

        def listing() -> dict[str, list[str]]:
            groups: dict[str, list[str]] = {}
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :].split("/", 1)[0]
                    try:
                        groups.setdefault(check_backup_name(name), []).append(obj["Key"])
                    except CatalogError:
                        continue
            return groups

        return with_retries(f"listing of {loc.url}", loc.attempts, loc.retry_base_seconds, listing)

    def _delete_keys(self, keys: list[str]) -> None:
        loc = self.location

        def remove() -> None:
            for key in keys:
                self._s3.delete_object(Bucket=loc.bucket, Key=key)

        with_retries(f"deletion from {loc.url}", loc.attempts, loc.retry_base_seconds, remove)

    def delete(self, name: str) -> None:
        """Delete one backup from the bucket, manifest first (so a half-deleted one is not a backup)."""
        loc = self.location

        def remove() -> None:
            prefix = loc.key(name, "")
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
            manifest_key = loc.key(name, MANIFEST)
            if manifest_key in keys:
                self._s3.delete_object(Bucket=loc.bucket, Key=manifest_key)
            for key in keys:
                if key != manifest_key:
                    self._s3.delete_object(Bucket=loc.bucket, Key=key)

        with_retries(f"deletion of {name} from {loc.url}", loc.attempts, loc.retry_base_seconds, remove)
