import datetime

from aitl_client.aitl.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class PreferenceStrength(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFERENCE_STRENGTH_UNSPECIFIED: _ClassVar[PreferenceStrength]
    PREFERENCE_STRENGTH_SLIGHTLY_BETTER: _ClassVar[PreferenceStrength]
    PREFERENCE_STRENGTH_BETTER: _ClassVar[PreferenceStrength]
    PREFERENCE_STRENGTH_SIGNIFICANTLY_BETTER: _ClassVar[PreferenceStrength]

class AdoptionDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADOPTION_DECISION_UNSPECIFIED: _ClassVar[AdoptionDecision]
    ADOPTION_DECISION_ADOPTED_AS_IS: _ClassVar[AdoptionDecision]
    ADOPTION_DECISION_EDITED: _ClassVar[AdoptionDecision]
    ADOPTION_DECISION_REJECTED: _ClassVar[AdoptionDecision]

class RelevanceLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEVANCE_LABEL_UNSPECIFIED: _ClassVar[RelevanceLabel]
    RELEVANCE_LABEL_RELEVANT: _ClassVar[RelevanceLabel]
    RELEVANCE_LABEL_PARTIALLY_RELEVANT: _ClassVar[RelevanceLabel]
    RELEVANCE_LABEL_IRRELEVANT: _ClassVar[RelevanceLabel]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_CANCELLED: FinishReason
PREFERENCE_STRENGTH_UNSPECIFIED: PreferenceStrength
PREFERENCE_STRENGTH_SLIGHTLY_BETTER: PreferenceStrength
PREFERENCE_STRENGTH_BETTER: PreferenceStrength
PREFERENCE_STRENGTH_SIGNIFICANTLY_BETTER: PreferenceStrength
ADOPTION_DECISION_UNSPECIFIED: AdoptionDecision
ADOPTION_DECISION_ADOPTED_AS_IS: AdoptionDecision
ADOPTION_DECISION_EDITED: AdoptionDecision
ADOPTION_DECISION_REJECTED: AdoptionDecision
RELEVANCE_LABEL_UNSPECIFIED: RelevanceLabel
RELEVANCE_LABEL_RELEVANT: RelevanceLabel
RELEVANCE_LABEL_PARTIALLY_RELEVANT: RelevanceLabel
RELEVANCE_LABEL_IRRELEVANT: RelevanceLabel

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "context", "top_k", "filter", "request_context")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    query: str
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.ConversationTurn]
    top_k: int
    filter: _common_pb2.KnowledgeFilter
    request_context: _common_pb2.RequestContext
    def __init__(self, query: _Optional[str] = ..., context: _Optional[_Iterable[_Union[_common_pb2.ConversationTurn, _Mapping]]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[_common_pb2.KnowledgeFilter, _Mapping]] = ..., request_context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ...) -> None: ...

class ScoredKnowledge(_message.Message):
    __slots__ = ("knowledge", "score", "rank")
    KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    knowledge: _common_pb2.KnowledgeObject
    score: float
    rank: int
    def __init__(self, knowledge: _Optional[_Union[_common_pb2.KnowledgeObject, _Mapping]] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("interaction_id", "results", "models", "timings")
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    interaction_id: str
    results: _containers.RepeatedCompositeFieldContainer[ScoredKnowledge]
    models: _common_pb2.ModelVersions
    timings: _common_pb2.Timings
    def __init__(self, interaction_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoredKnowledge, _Mapping]]] = ..., models: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class Passages(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class KnowledgeIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("query", "context", "knowledge_ids", "retrieve_interaction_id", "passages", "top_n", "request_context")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_IDS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    query: str
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.ConversationTurn]
    knowledge_ids: KnowledgeIds
    retrieve_interaction_id: str
    passages: Passages
    top_n: int
    request_context: _common_pb2.RequestContext
    def __init__(self, query: _Optional[str] = ..., context: _Optional[_Iterable[_Union[_common_pb2.ConversationTurn, _Mapping]]] = ..., knowledge_ids: _Optional[_Union[KnowledgeIds, _Mapping]] = ..., retrieve_interaction_id: _Optional[str] = ..., passages: _Optional[_Union[Passages, _Mapping]] = ..., top_n: _Optional[int] = ..., request_context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("knowledge", "passage_index", "score", "rank")
    KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    knowledge: ScoredKnowledge
    passage_index: int
    score: float
    rank: int
    def __init__(self, knowledge: _Optional[_Union[ScoredKnowledge, _Mapping]] = ..., passage_index: _Optional[int] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("interaction_id", "items", "models", "timings")
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    interaction_id: str
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    models: _common_pb2.ModelVersions
    timings: _common_pb2.Timings
    def __init__(self, interaction_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., models: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_new_tokens", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("conversation", "knowledge_ids", "grounding_interaction_id", "max_grounding", "num_candidates", "sampling", "system_prompt", "request_context")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUNDING_INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUNDING_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.ConversationTurn]
    knowledge_ids: KnowledgeIds
    grounding_interaction_id: str
    max_grounding: int
    num_candidates: int
    sampling: SamplingParams
    system_prompt: str
    request_context: _common_pb2.RequestContext
    def __init__(self, conversation: _Optional[_Iterable[_Union[_common_pb2.ConversationTurn, _Mapping]]] = ..., knowledge_ids: _Optional[_Union[KnowledgeIds, _Mapping]] = ..., grounding_interaction_id: _Optional[str] = ..., max_grounding: _Optional[int] = ..., num_candidates: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., system_prompt: _Optional[str] = ..., request_context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("candidate_id", "text", "cited_knowledge_ids", "finish_reason", "prompt_tokens", "completion_tokens", "model_version")
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CITED_KNOWLEDGE_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    text: str
    cited_knowledge_ids: _containers.RepeatedScalarFieldContainer[str]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_version: str
    def __init__(self, candidate_id: _Optional[str] = ..., text: _Optional[str] = ..., cited_knowledge_ids: _Optional[_Iterable[str]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("interaction_id", "candidates", "grounding", "models", "timings")
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    GROUNDING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    interaction_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    grounding: _containers.RepeatedCompositeFieldContainer[ScoredKnowledge]
    models: _common_pb2.ModelVersions
    timings: _common_pb2.Timings
    def __init__(self, interaction_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., grounding: _Optional[_Iterable[_Union[ScoredKnowledge, _Mapping]]] = ..., models: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("started", "delta", "finished", "done")
    class Started(_message.Message):
        __slots__ = ("interaction_id", "candidate_ids", "grounding", "models")
        INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
        CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
        GROUNDING_FIELD_NUMBER: _ClassVar[int]
        MODELS_FIELD_NUMBER: _ClassVar[int]
        interaction_id: str
        candidate_ids: _containers.RepeatedScalarFieldContainer[str]
        grounding: _containers.RepeatedCompositeFieldContainer[ScoredKnowledge]
        models: _common_pb2.ModelVersions
        def __init__(self, interaction_id: _Optional[str] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., grounding: _Optional[_Iterable[_Union[ScoredKnowledge, _Mapping]]] = ..., models: _Optional[_Union[_common_pb2.ModelVersions, _Mapping]] = ...) -> None: ...
    class Delta(_message.Message):
        __slots__ = ("candidate_id", "text")
        CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
        TEXT_FIELD_NUMBER: _ClassVar[int]
        candidate_id: str
        text: str
        def __init__(self, candidate_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    started: GenerateEvent.Started
    delta: GenerateEvent.Delta
    finished: Candidate
    done: _common_pb2.Timings
    def __init__(self, started: _Optional[_Union[GenerateEvent.Started, _Mapping]] = ..., delta: _Optional[_Union[GenerateEvent.Delta, _Mapping]] = ..., finished: _Optional[_Union[Candidate, _Mapping]] = ..., done: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class PairwisePreference(_message.Message):
    __slots__ = ("preferred_candidate_id", "other_candidate_id", "strength", "rationale")
    PREFERRED_CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    OTHER_CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    preferred_candidate_id: str
    other_candidate_id: str
    strength: PreferenceStrength
    rationale: str
    def __init__(self, preferred_candidate_id: _Optional[str] = ..., other_candidate_id: _Optional[str] = ..., strength: _Optional[_Union[PreferenceStrength, str]] = ..., rationale: _Optional[str] = ...) -> None: ...

class Adoption(_message.Message):
    __slots__ = ("candidate_id", "decision", "sent_text", "rationale")
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    decision: AdoptionDecision
    sent_text: str
    rationale: str
    def __init__(self, candidate_id: _Optional[str] = ..., decision: _Optional[_Union[AdoptionDecision, str]] = ..., sent_text: _Optional[str] = ..., rationale: _Optional[str] = ...) -> None: ...

class KnowledgeJudgement(_message.Message):
    __slots__ = ("knowledge_id", "label")
    KNOWLEDGE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    knowledge_id: str
    label: RelevanceLabel
    def __init__(self, knowledge_id: _Optional[str] = ..., label: _Optional[_Union[RelevanceLabel, str]] = ...) -> None: ...

class KnowledgeRelevance(_message.Message):
    __slots__ = ("judgements",)
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    judgements: _containers.RepeatedCompositeFieldContainer[KnowledgeJudgement]
    def __init__(self, judgements: _Optional[_Iterable[_Union[KnowledgeJudgement, _Mapping]]] = ...) -> None: ...

class ExternalReference(_message.Message):
    __slots__ = ("title", "uri", "excerpt")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    EXCERPT_FIELD_NUMBER: _ClassVar[int]
    title: str
    uri: str
    excerpt: str
    def __init__(self, title: _Optional[str] = ..., uri: _Optional[str] = ..., excerpt: _Optional[str] = ...) -> None: ...

class MissingKnowledge(_message.Message):
    __slots__ = ("knowledge_id", "external", "note")
    KNOWLEDGE_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    knowledge_id: str
    external: ExternalReference
    note: str
    def __init__(self, knowledge_id: _Optional[str] = ..., external: _Optional[_Union[ExternalReference, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class Annotation(_message.Message):
    __slots__ = ("annotation_id", "interaction_id", "agent_id", "case_id", "tenant", "shown_at", "annotated_at", "preference", "adoption", "relevance", "missing_knowledge")
    ANNOTATION_ID_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SHOWN_AT_FIELD_NUMBER: _ClassVar[int]
    ANNOTATED_AT_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    ADOPTION_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    MISSING_KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    annotation_id: str
    interaction_id: str
    agent_id: str
    case_id: str
    tenant: str
    shown_at: _timestamp_pb2.Timestamp
    annotated_at: _timestamp_pb2.Timestamp
    preference: PairwisePreference
    adoption: Adoption
    relevance: KnowledgeRelevance
    missing_knowledge: MissingKnowledge
    def __init__(self, annotation_id: _Optional[str] = ..., interaction_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., case_id: _Optional[str] = ..., tenant: _Optional[str] = ..., shown_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., annotated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., preference: _Optional[_Union[PairwisePreference, _Mapping]] = ..., adoption: _Optional[_Union[Adoption, _Mapping]] = ..., relevance: _Optional[_Union[KnowledgeRelevance, _Mapping]] = ..., missing_knowledge: _Optional[_Union[MissingKnowledge, _Mapping]] = ...) -> None: ...

class SubmitAnnotationRequest(_message.Message):
    __slots__ = ("annotation",)
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    annotation: Annotation
    def __init__(self, annotation: _Optional[_Union[Annotation, _Mapping]] = ...) -> None: ...

class SubmitAnnotationResponse(_message.Message):
    __slots__ = ("annotation_id", "duplicate", "log_sequence", "annotation_delay")
    ANNOTATION_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_DELAY_FIELD_NUMBER: _ClassVar[int]
    annotation_id: str
    duplicate: bool
    log_sequence: int
    annotation_delay: _duration_pb2.Duration
    def __init__(self, annotation_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., log_sequence: _Optional[int] = ..., annotation_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
