import datetime

from aitl_client.aitl.v1 import common_pb2 as _common_pb2
from aitl_client.aitl.v1 import support_pb2 as _support_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InteractionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERACTION_KIND_UNSPECIFIED: _ClassVar[InteractionKind]
    INTERACTION_KIND_RETRIEVE: _ClassVar[InteractionKind]
    INTERACTION_KIND_RANK: _ClassVar[InteractionKind]
    INTERACTION_KIND_GENERATE: _ClassVar[InteractionKind]
INTERACTION_KIND_UNSPECIFIED: InteractionKind
INTERACTION_KIND_RETRIEVE: InteractionKind
INTERACTION_KIND_RANK: InteractionKind
INTERACTION_KIND_GENERATE: InteractionKind

class LogRecord(_message.Message):
    __slots__ = ("format_version", "sequence", "written_at", "interaction", "annotation")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_AT_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    sequence: int
    written_at: _timestamp_pb2.Timestamp
    interaction: InteractionRecord
    annotation: AnnotationRecord
    def __init__(self, format_version: _Optional[int] = ..., sequence: _Optional[int] = ..., written_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., interaction: _Optional[_Union[InteractionRecord, _Mapping]] = ..., annotation: _Optional[_Union[AnnotationRecord, _Mapping]] = ...) -> None: ...

class ShownKnowledge(_message.Message):
    __slots__ = ("knowledge_id", "version", "score", "rank")
    KNOWLEDGE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    knowledge_id: str
    version: int
    score: float
    rank: int
    def __init__(self, knowledge_id: _Optional[str] = ..., version: _Optional[int] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class InteractionRecord(_message.Message):
    __slots__ = ("interaction_id", "kind", "created_at", "request_context", "retrieve", "rank", "generate", "shown_knowledge", "candidates", "models", "timings", "redactions", "tenant")
    class RedactionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    SHOWN_KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REDACTIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    interaction_id: str
    kind: InteractionKind
    created_at: _timestamp_pb2.Timestamp
    request_context: _common_pb2.RequestContext
    retrieve: _support_pb2.RetrieveRequest
    rank: _support_pb2.RankRequest
    generate: _support_pb2.GenerateRequest
    shown_knowledge: _containers.RepeatedCompositeFieldContainer[ShownKnowledge]
    candidates: _containers.RepeatedCompositeFieldContainer[_support_pb2.Candidate]
    models: _common_pb2.ModelVersions
    timings: _common_pb2.Timings
    redactions: _containers.ScalarMap[str, int]
    tenant: str
    def __init__(self, interaction_id: _Optional[str] = ..., kind: _Optional[_Union[InteractionKind, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., retrieve: _Optional[_Union[_support_pb2.RetrieveRequest, _Mapping]] = ..., rank: _Optional[_Union[_support_pb2.RankRequest, _Mapping]] = ..., generate: _Optional[_Union[_support_pb2.GenerateRequest, _Mapping]] = ..., shown_knowledge: _Optional[_Iterable[_Union[ShownKnowledge, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[_support_pb2.Candidate, _Mapping]]] = ..., models: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., redactions: _Optional[_Mapping[str, int]] = ..., tenant: _Optional[str] = ...) -> None: ...

class AnnotationRecord(_message.Message):
    __slots__ = ("annotation", "received_at", "delay", "content_sha256", "redactions", "tenant")
    class RedactionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    REDACTIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    annotation: _support_pb2.Annotation
    received_at: _timestamp_pb2.Timestamp
    delay: _duration_pb2.Duration
    content_sha256: bytes
    redactions: _containers.ScalarMap[str, int]
    tenant: str
    def __init__(self, annotation: _Optional[_Union[_support_pb2.Annotation, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., content_sha256: _Optional[bytes] = ..., redactions: _Optional[_Mapping[str, int]] = ..., tenant: _Optional[str] = ...) -> None: ...
