"""Which Kubernetes pod holds which GPU: the kubelet's pod-resources API (``v1.PodResourcesLister/List``).

The kubelet answers on a unix socket (``/var/lib/kubelet/pod-resources/kubelet.sock``) with
every pod's devices, by device-plugin resource (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``)
and device id (the GPU's UUID; ``UUID::N`` for a time-sliced replica). This maps GPUs to pods
even when the exporter cannot see the pods' processes (no hostPID), as dcgm-exporter's
``--kubernetes`` does.

gRPC comes from ``grpcio`` (the optional ``mlwarden[kubernetes]`` extra). The few protobuf
messages are decoded here by hand, so neither ``protobuf`` nor generated code is needed. No
socket, or no grpcio: the source is off, said once in an info line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
LIST_METHOD = "/v1.PodResourcesLister/List"
_GPU_RESOURCE_PREFIX = "nvidia.com/"
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True, order=True)
class PodContainer:
    namespace: str
    pod: str
    container: str


class ProtobufError(ValueError):
    """The kubelet's answer is not the protobuf message it should be."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one message: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire == _LENGTH:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ProtobufError("truncated field")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            if pos + width > len(data):
                raise ProtobufError("truncated field")
            value, pos = data[pos:pos + width], pos + width
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        yield number, value


def _message(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ProtobufError("expected an embedded message")
    return value


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a string field")
    return value.decode("utf-8", errors="replace")


def decode_list_response(data: bytes) -> dict[str, list[PodContainer]]:
    """GPU device id (UUID, replica suffix dropped) -> the containers it is allocated to.

    ListPodResourcesResponse{1: PodResources{1: name, 2: namespace, 3: ContainerResources{
    1: name, 2: ContainerDevices{1: resource_name, 2: device_ids}}}}; other fields are skipped.
    """
    owners: dict[str, set[PodContainer]] = {}
    for number, pod in fields(data):
        if number != 1:
            continue
        name = namespace = ""
        containers: list[bytes] = []
        for field_number, value in fields(_message(pod)):
            if field_number == 1:
                name = _text(value)
            elif field_number == 2:
                namespace = _text(value)
            elif field_number == 3:
                containers.append(_message(value))
        for container in containers:
            container_name = ""
            devices: list[bytes] = []
            for field_number, value in fields(container):
                if field_number == 1:
                    container_name = _text(value)
                elif field_number == 2:
                    devices.append(_message(value))
            owner = PodContainer(namespace, name, container_name)
            for device in devices:
                resource, ids = "", []
                for field_number, value in fields(device):
                    if field_number == 1:
                        resource = _text(value)
                    elif field_number == 2:
                        ids.append(_text(value))
                if resource.startswith(_GPU_RESOURCE_PREFIX):
                    for device_id in ids:
                        owners.setdefault(device_id.split("::", 1)[0], set()).add(owner)
    return {device: sorted(found) for device, found in owners.items()}


def failure_reason(exc: BaseException) -> str:
    """What went wrong, for the log: a gRPC error's ``details()``, else the exception's text.

    Only a callable ``details`` is called: an exception that carries ``details`` as plain data
    must not turn a failed call into a TypeError that fails the whole collection pass.
    """
    details = getattr(exc, "details", None)
    reason = details() if callable(details) else None
    return str(reason) if reason else str(exc) or type(exc).__name__


class PodResourcesClient:
    """Asks the kubelet once per call; ``None`` means "this source is off or failed this time"."""

    def __init__(self, socket_path: Path = DEFAULT_SOCKET, timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._call: Any = None
        self._channel: Any = None
        self._said_off = False
        self._failing = False

    def gpu_owners(self) -> dict[str, list[PodContainer]] | None:
        call = self._connect()
        if call is None:
            return None
        try:
            owners: dict[str, list[PodContainer]] = call(b"", timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - grpc.RpcError or a malformed answer: off for this pass
            if not self._failing:
                log.warning("kubelet pod-resources API at %s: %s; pod labels are empty until it answers",
                            self.socket_path, failure_reason(exc))
                self._failing = True
            return None
        if self._failing:
            log.info("kubelet pod-resources API at %s answers again", self.socket_path)
            self._failing = False
        return owners

    def _connect(self) -> Any:
        if self._call is not None:
            return self._call
        if not self.socket_path.is_socket():
            self._off(f"no kubelet pod-resources socket at {self.socket_path}")
            return None
        try:
            import grpc
        except ImportError:
            self._off(f"{self.socket_path} exists but grpcio is not installed (pip install 'mlwarden[kubernetes]')")
            return None
        self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        self._call = self._channel.unary_unary(
            LIST_METHOD, request_serializer=bytes, response_deserializer=decode_list_response,
        )
        log.info("Kubernetes pod attribution from the kubelet pod-resources API at %s", self.socket_path)
        return self._call

    def _off(self, reason: str) -> None:
        if not self._said_off:
            log.info("Kubernetes pod attribution off: %s", reason)
            self._said_off = True

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._call = None
