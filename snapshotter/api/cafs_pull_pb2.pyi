from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanRequest(_message.Message):
    __slots__ = ("ref", "name")
    REF_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ref: str
    name: str
    def __init__(self, ref: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("media_type", "digest", "data")
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    media_type: str
    digest: str
    data: bytes
    def __init__(self, media_type: _Optional[str] = ..., digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("name", "manifest", "config", "index", "chains", "layer_digests")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    manifest: Blob
    config: Blob
    index: Blob
    chains: _containers.RepeatedScalarFieldContainer[str]
    layer_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., manifest: _Optional[_Union[Blob, _Mapping]] = ..., config: _Optional[_Union[Blob, _Mapping]] = ..., index: _Optional[_Union[Blob, _Mapping]] = ..., chains: _Optional[_Iterable[str]] = ..., layer_digests: _Optional[_Iterable[str]] = ...) -> None: ...
