//! Which fields of a log record are free text a customer or an agent wrote,
//! or a model wrote from it. Ids, versions, scores and timings are left as
//! they are: the worker joins records on them.

use super::{Redactions, Redactor};
use crate::proto::{
    Annotation, ConversationTurn, InteractionRecord, annotation::Kind, interaction_record::Request,
    missing_knowledge::Source, rank_request::Candidates,
};

impl Redactor {
    /// Redacts the request's texts and the candidates; the counts go into
    /// `record.redactions`.
    pub fn interaction(&self, record: &mut InteractionRecord) {
        if !self.enabled() {
            return;
        }
        let mut counts = Redactions::new();
        match &mut record.request {
            Some(Request::Retrieve(r)) => {
                self.redact_in_place(&mut r.query, &mut counts);
                self.turns(&mut r.context, &mut counts);
            }
            Some(Request::Rank(r)) => {
                self.redact_in_place(&mut r.query, &mut counts);
                self.turns(&mut r.context, &mut counts);
                if let Some(Candidates::Passages(p)) = &mut r.candidates {
                    for text in &mut p.texts {
                        self.redact_in_place(text, &mut counts);
                    }
                }
            }
            Some(Request::Generate(g)) => {
                self.turns(&mut g.conversation, &mut counts);
                self.redact_in_place(&mut g.system_prompt, &mut counts);
            }
            None => {}
        }
        for candidate in &mut record.candidates {
            self.redact_in_place(&mut candidate.text, &mut counts);
        }
        record.redactions = counts;
    }

    /// Redacts the annotation's texts; returns the counts for its record.
    pub fn annotation(&self, annotation: &mut Annotation) -> Redactions {
        let mut counts = Redactions::new();
        if !self.enabled() {
            return counts;
        }
        match &mut annotation.kind {
            Some(Kind::Preference(p)) => self.redact_in_place(&mut p.rationale, &mut counts),
            Some(Kind::Adoption(a)) => {
                self.redact_in_place(&mut a.sent_text, &mut counts);
                self.redact_in_place(&mut a.rationale, &mut counts);
            }
            Some(Kind::MissingKnowledge(m)) => {
                if let Some(Source::External(e)) = &mut m.source {
                    self.redact_in_place(&mut e.title, &mut counts);
                    self.redact_in_place(&mut e.uri, &mut counts);
                    self.redact_in_place(&mut e.excerpt, &mut counts);
                }
                self.redact_in_place(&mut m.note, &mut counts);
            }
            Some(Kind::Relevance(_)) | None => {}
        }
        counts
    }

    fn turns(&self, turns: &mut [ConversationTurn], counts: &mut Redactions) {
        for turn in turns {
            self.redact_in_place(&mut turn.text, counts);
        }
    }
}
