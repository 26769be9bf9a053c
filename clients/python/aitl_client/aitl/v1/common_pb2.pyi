import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KnowledgeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KNOWLEDGE_KIND_UNSPECIFIED: _ClassVar[KnowledgeKind]
    KNOWLEDGE_KIND_POLICY: _ClassVar[KnowledgeKind]
    KNOWLEDGE_KIND_CASE: _ClassVar[KnowledgeKind]
    KNOWLEDGE_KIND_FAQ: _ClassVar[KnowledgeKind]
    KNOWLEDGE_KIND_OTHER: _ClassVar[KnowledgeKind]

class Speaker(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEAKER_UNSPECIFIED: _ClassVar[Speaker]
    SPEAKER_CUSTOMER: _ClassVar[Speaker]
    SPEAKER_AGENT: _ClassVar[Speaker]
KNOWLEDGE_KIND_UNSPECIFIED: KnowledgeKind
KNOWLEDGE_KIND_POLICY: KnowledgeKind
KNOWLEDGE_KIND_CASE: KnowledgeKind
KNOWLEDGE_KIND_FAQ: KnowledgeKind
KNOWLEDGE_KIND_OTHER: KnowledgeKind
SPEAKER_UNSPECIFIED: Speaker
SPEAKER_CUSTOMER: Speaker
SPEAKER_AGENT: Speaker

class KnowledgeObject(_message.Message):
    __slots__ = ("id", "kind", "title", "text", "metadata", "version", "updated_at", "deleted")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: KnowledgeKind
    title: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    version: int
    updated_at: _timestamp_pb2.Timestamp
    deleted: bool
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[KnowledgeKind, str]] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deleted: _Optional[bool] = ...) -> None: ...

class KnowledgeFilter(_message.Message):
    __slots__ = ("kinds", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KINDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[KnowledgeKind]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, kinds: _Optional[_Iterable[_Union[KnowledgeKind, str]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConversationTurn(_message.Message):
    __slots__ = ("speaker", "text")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    speaker: Speaker
    text: str
    def __init__(self, speaker: _Optional[_Union[Speaker, str]] = ..., text: _Optional[str] = ...) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("embedder", "ranker", "generator")
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    embedder: str
    ranker: str
    generator: str
    def __init__(self, embedder: _Optional[str] = ..., ranker: _Optional[str] = ..., generator: _Optional[str] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("agent_id", "case_id", "tenant")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    case_id: str
    tenant: str
    def __init__(self, agent_id: _Optional[str] = ..., case_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ns", "compute_ns", "total_ns", "device")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    compute_ns: int
    total_ns: int
    device: str
    def __init__(self, queue_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...
