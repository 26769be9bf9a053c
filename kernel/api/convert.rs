//! Validation of wire messages, with the limits the proto comments document.
//! Every error names the field (as a path from the request) and the limit, so
//! a client developer can fix the call without reading server code.

use std::{collections::HashSet, time::SystemTime};

use crate::{
    error::{Error, Result},
    proto::{
        ConversationTurn, GenerateRequest, KnowledgeFilter, KnowledgeKind, KnowledgeObject, RankRequest,
        RequestContext, RetrieveRequest, SamplingParams, Speaker, rank_request,
    },
};

pub const MAX_ID_BYTES: usize = 256;
pub const MAX_SHORT_ID_BYTES: usize = 128;
pub const MAX_TITLE_BYTES: usize = 1_024;
pub const MAX_KNOWLEDGE_TEXT_BYTES: usize = 65_536;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_BYTES: usize = 128;
pub const MAX_METADATA_VALUE_BYTES: usize = 1_024;
pub const MAX_QUERY_BYTES: usize = 16_384;
pub const MAX_TURN_BYTES: usize = 16_384;
pub const MAX_TURNS: usize = 64;
pub const MAX_TOP_K: u32 = 1_000;
pub const DEFAULT_TOP_K: u32 = 10;
pub const MAX_ITEMS: usize = 1_000;
pub const MAX_CANDIDATES: u32 = 8;
pub const MAX_NEW_TOKENS: u32 = 4_096;
pub const MAX_STOP_SEQUENCES: usize = 8;
pub const MAX_STOP_BYTES: usize = 64;
pub const MAX_RATIONALE_BYTES: usize = 4_096;
pub const MAX_SENT_TEXT_BYTES: usize = 16_384;
pub const MAX_URI_BYTES: usize = 2_048;
pub const MAX_EXCERPT_BYTES: usize = 16_384;
pub const MAX_PAGE_SIZE: u32 = 1_000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// A required identifier: 1..=max bytes, not only white space, no control
/// characters.
pub fn check_id(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "is blank; send a non-blank identifier"));
    }
    check_len(field, value, max)?;
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

pub fn check_optional_id(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() { Ok(()) } else { check_id(field, value, max) }
}

pub fn check_len(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(field, format!("is {} bytes; the limit is {max} bytes", value.len())));
    }
    Ok(())
}

pub fn check_text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "is required and must not be blank"));
    }
    check_len(field, value, max)
}

fn check_kind(field: &str, kind: i32) -> Result<KnowledgeKind> {
    match KnowledgeKind::try_from(kind) {
        Ok(KnowledgeKind::Unspecified) | Err(_) => {
            Err(Error::invalid(field, format!("{kind} is not a knowledge kind; use POLICY, CASE, FAQ or OTHER")))
        }
        Ok(kind) => Ok(kind),
    }
}

pub fn check_request_context(field: &str, ctx: Option<&RequestContext>) -> Result<()> {
    if let Some(ctx) = ctx {
        check_optional_id(&format!("{field}.agent_id"), &ctx.agent_id, MAX_SHORT_ID_BYTES)?;
        check_optional_id(&format!("{field}.case_id"), &ctx.case_id, MAX_SHORT_ID_BYTES)?;
        check_optional_id(&format!("{field}.tenant"), &ctx.tenant, MAX_SHORT_ID_BYTES)?;
    }
    Ok(())
}

pub fn check_filter(field: &str, filter: Option<&KnowledgeFilter>) -> Result<()> {
    if let Some(filter) = filter {
        for (i, kind) in filter.kinds.iter().enumerate() {
            check_kind(&format!("{field}.kinds[{i}]"), *kind)?;
        }
        check_metadata(&format!("{field}.metadata"), &filter.metadata)?;
    }
    Ok(())
}

fn check_metadata(field: &str, metadata: &std::collections::HashMap<String, String>) -> Result<()> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            field,
            format!("has {} entries; the limit is {MAX_METADATA_ENTRIES}", metadata.len()),
        ));
    }
    for (key, value) in metadata {
        check_id(&format!("{field} key"), key, MAX_METADATA_KEY_BYTES)?;
        check_len(&format!("{field}[{key:?}]"), value, MAX_METADATA_VALUE_BYTES)?;
    }
    Ok(())
}

pub fn check_knowledge_object(field: &str, object: &KnowledgeObject) -> Result<()> {
    check_id(&format!("{field}.id"), &object.id, MAX_ID_BYTES)?;
    check_kind(&format!("{field}.kind"), object.kind)?;
    check_len(&format!("{field}.title"), &object.title, MAX_TITLE_BYTES)?;
    check_text(&format!("{field}.text"), &object.text, MAX_KNOWLEDGE_TEXT_BYTES)?;
    check_metadata(&format!("{field}.metadata"), &object.metadata)
}

pub fn check_upsert_batch(objects: &[KnowledgeObject]) -> Result<()> {
    if objects.is_empty() || objects.len() > MAX_ITEMS {
        return Err(Error::invalid(
            "objects",
            format!("has {} objects; send 1 to {MAX_ITEMS} per batch", objects.len()),
        ));
    }
    let mut seen = HashSet::new();
    for (i, object) in objects.iter().enumerate() {
        check_knowledge_object(&format!("objects[{i}]"), object)?;
        if !seen.insert(object.id.as_str()) {
            return Err(Error::invalid(
                &format!("objects[{i}].id"),
                format!("{:?} appears twice in this batch", object.id),
            ));
        }
    }
    Ok(())
}

fn check_turns(field: &str, turns: &[ConversationTurn], required: bool) -> Result<()> {
    if required && turns.is_empty() {
        return Err(Error::invalid(field, "needs at least one turn"));
    }
    if turns.len() > MAX_TURNS {
        return Err(Error::invalid(field, format!("has {} turns; the limit is {MAX_TURNS}", turns.len())));
    }
    for (i, turn) in turns.iter().enumerate() {
        if !matches!(Speaker::try_from(turn.speaker), Ok(Speaker::Customer | Speaker::Agent)) {
            return Err(Error::invalid(&format!("{field}[{i}].speaker"), "must be CUSTOMER or AGENT"));
        }
        check_text(&format!("{field}[{i}].text"), &turn.text, MAX_TURN_BYTES)?;
    }
    Ok(())
}

pub fn check_knowledge_ids(field: &str, ids: &[String]) -> Result<()> {
    if ids.is_empty() || ids.len() > MAX_ITEMS {
        return Err(Error::invalid(field, format!("has {} ids; send 1 to {MAX_ITEMS}", ids.len())));
    }
    let mut seen = HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        check_id(&format!("{field}[{i}]"), id, MAX_ID_BYTES)?;
        if !seen.insert(id.as_str()) {
            return Err(Error::invalid(&format!("{field}[{i}]"), format!("{id:?} appears twice")));
        }
    }
    Ok(())
}

pub fn check_retrieve(req: &RetrieveRequest) -> Result<()> {
    check_text("query", &req.query, MAX_QUERY_BYTES)?;
    check_turns("context", &req.context, false)?;
    if req.top_k > MAX_TOP_K {
        return Err(Error::invalid("top_k", format!("is {}; the limit is {MAX_TOP_K}", req.top_k)));
    }
    check_filter("filter", req.filter.as_ref())?;
    check_request_context("request_context", req.request_context.as_ref())
}

pub fn check_rank(req: &RankRequest) -> Result<()> {
    check_text("query", &req.query, MAX_QUERY_BYTES)?;
    check_turns("context", &req.context, false)?;
    match &req.candidates {
        None => {
            return Err(Error::invalid("candidates", "set one of knowledge_ids, retrieve_interaction_id, passages"));
        }
        Some(rank_request::Candidates::KnowledgeIds(ids)) => check_knowledge_ids("knowledge_ids.ids", &ids.ids)?,
        Some(rank_request::Candidates::RetrieveInteractionId(id)) => {
            check_id("retrieve_interaction_id", id, MAX_SHORT_ID_BYTES)?
        }
        Some(rank_request::Candidates::Passages(passages)) => {
            if passages.texts.is_empty() || passages.texts.len() > MAX_ITEMS {
                return Err(Error::invalid(
                    "passages.texts",
                    format!("has {} passages; send 1 to {MAX_ITEMS}", passages.texts.len()),
                ));
            }
            for (i, text) in passages.texts.iter().enumerate() {
                check_text(&format!("passages.texts[{i}]"), text, MAX_KNOWLEDGE_TEXT_BYTES)?;
            }
        }
    }
    check_request_context("request_context", req.request_context.as_ref())
}

fn check_sampling(field: &str, sampling: Option<&SamplingParams>) -> Result<()> {
    let Some(s) = sampling else { return Ok(()) };
    let in_range = |name: &str, value: f32, max: f32| -> Result<()> {
        if !value.is_finite() || value < 0.0 || value > max {
            return Err(Error::invalid(&format!("{field}.{name}"), format!("is {value}; use 0 to {max}")));
        }
        Ok(())
    };
    in_range("temperature", s.temperature, 5.0)?;
    in_range("top_p", s.top_p, 1.0)?;
    in_range("repetition_penalty", s.repetition_penalty, 10.0)?;
    if s.max_new_tokens > MAX_NEW_TOKENS {
        return Err(Error::invalid(
            &format!("{field}.max_new_tokens"),
            format!("is {}; the limit is {MAX_NEW_TOKENS}", s.max_new_tokens),
        ));
    }
    if s.stop.len() > MAX_STOP_SEQUENCES {
        return Err(Error::invalid(
            &format!("{field}.stop"),
            format!("has {} entries; the limit is {MAX_STOP_SEQUENCES}", s.stop.len()),
        ));
    }
    for (i, stop) in s.stop.iter().enumerate() {
        if stop.is_empty() {
            return Err(Error::invalid(&format!("{field}.stop[{i}]"), "must not be empty"));
        }
        check_len(&format!("{field}.stop[{i}]"), stop, MAX_STOP_BYTES)?;
    }
    Ok(())
}

pub fn check_generate(req: &GenerateRequest) -> Result<()> {
    use crate::proto::generate_request::Grounding;
    check_turns("conversation", &req.conversation, true)?;
    if req.conversation.last().map(|t| t.speaker) != Some(Speaker::Customer as i32) {
        return Err(Error::invalid("conversation", "must end with the customer's turn"));
    }
    match &req.grounding {
        Some(Grounding::KnowledgeIds(ids)) => check_knowledge_ids("knowledge_ids.ids", &ids.ids)?,
        Some(Grounding::GroundingInteractionId(id)) => check_id("grounding_interaction_id", id, MAX_SHORT_ID_BYTES)?,
        None => {}
    }
    if req.num_candidates > MAX_CANDIDATES {
        return Err(Error::invalid(
            "num_candidates",
            format!("is {}; the limit is {MAX_CANDIDATES}", req.num_candidates),
        ));
    }
    check_sampling("sampling", req.sampling.as_ref())?;
    check_len("system_prompt", &req.system_prompt, MAX_TURN_BYTES)?;
    check_request_context("request_context", req.request_context.as_ref())
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range
/// google.protobuf.Timestamp allows.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A wire timestamp as SystemTime, or an error naming the field. Only the
/// range and form google.protobuf.Timestamp defines are accepted: prost
/// would otherwise carry excess nanos into the seconds.
pub fn timestamp(field: &str, ts: Option<&prost_types::Timestamp>) -> Result<SystemTime> {
    let ts = ts.ok_or_else(|| Error::invalid(field, "is required"))?;
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Error::invalid(field, format!("has nanos {}; send 0 to 999,999,999", ts.nanos)));
    }
    if !TIMESTAMP_SECONDS.contains(&ts.seconds) {
        return Err(Error::invalid(
            field,
            format!("has seconds {}, outside years 1 to 9999 that a Timestamp may hold", ts.seconds),
        ));
    }
    SystemTime::try_from(*ts).map_err(|e| Error::invalid(field, format!("is not a valid timestamp: {e}")))
}
