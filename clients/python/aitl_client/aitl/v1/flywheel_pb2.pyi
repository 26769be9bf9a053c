import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServingModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServingModel(_message.Message):
    __slots__ = ("role", "version", "registry_version", "source", "challenger", "switching_to", "last_error")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_FIELD_NUMBER: _ClassVar[int]
    SWITCHING_TO_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    role: str
    version: str
    registry_version: str
    source: str
    challenger: str
    switching_to: str
    last_error: str
    def __init__(self, role: _Optional[str] = ..., version: _Optional[str] = ..., registry_version: _Optional[str] = ..., source: _Optional[str] = ..., challenger: _Optional[str] = ..., switching_to: _Optional[str] = ..., last_error: _Optional[str] = ...) -> None: ...

class GetServingModelsResponse(_message.Message):
    __slots__ = ("models", "challenger_share")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_SHARE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServingModel]
    challenger_share: float
    def __init__(self, models: _Optional[_Iterable[_Union[ServingModel, _Mapping]]] = ..., challenger_share: _Optional[float] = ...) -> None: ...

class ListKnowledgeGapsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class KnowledgeGap(_message.Message):
    __slots__ = ("key", "knowledge_id", "title", "uri", "reports", "immediate_reports", "agent_ids", "example_queries", "first_reported_at", "last_reported_at")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    IMMEDIATE_REPORTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    FIRST_REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    key: str
    knowledge_id: str
    title: str
    uri: str
    reports: int
    immediate_reports: int
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    example_queries: _containers.RepeatedScalarFieldContainer[str]
    first_reported_at: _timestamp_pb2.Timestamp
    last_reported_at: _timestamp_pb2.Timestamp
    def __init__(self, key: _Optional[str] = ..., knowledge_id: _Optional[str] = ..., title: _Optional[str] = ..., uri: _Optional[str] = ..., reports: _Optional[int] = ..., immediate_reports: _Optional[int] = ..., agent_ids: _Optional[_Iterable[str]] = ..., example_queries: _Optional[_Iterable[str]] = ..., first_reported_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_reported_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListKnowledgeGapsResponse(_message.Message):
    __slots__ = ("gaps", "total", "updated_at", "log_sequence")
    GAPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    gaps: _containers.RepeatedCompositeFieldContainer[KnowledgeGap]
    total: int
    updated_at: _timestamp_pb2.Timestamp
    log_sequence: int
    def __init__(self, gaps: _Optional[_Iterable[_Union[KnowledgeGap, _Mapping]]] = ..., total: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., log_sequence: _Optional[int] = ...) -> None: ...
