from aitl_client.aitl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpsertKnowledgeRequest(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[_common_pb2.KnowledgeObject]
    def __init__(self, objects: _Optional[_Iterable[_Union[_common_pb2.KnowledgeObject, _Mapping]]] = ...) -> None: ...

class UpsertKnowledgeResponse(_message.Message):
    __slots__ = ("inserted", "updated", "unchanged", "batches")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    updated: int
    unchanged: int
    batches: int
    def __init__(self, inserted: _Optional[int] = ..., updated: _Optional[int] = ..., unchanged: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class DeleteKnowledgeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteKnowledgeResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetKnowledgeRequest(_message.Message):
    __slots__ = ("id", "version", "include_deleted")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    include_deleted: bool
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., include_deleted: _Optional[bool] = ...) -> None: ...

class ListKnowledgeRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter", "include_deleted")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DELETED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: _common_pb2.KnowledgeFilter
    include_deleted: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[_Union[_common_pb2.KnowledgeFilter, _Mapping]] = ..., include_deleted: _Optional[bool] = ...) -> None: ...

class ListKnowledgeResponse(_message.Message):
    __slots__ = ("objects", "next_page_token")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[_common_pb2.KnowledgeObject]
    next_page_token: str
    def __init__(self, objects: _Optional[_Iterable[_Union[_common_pb2.KnowledgeObject, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
