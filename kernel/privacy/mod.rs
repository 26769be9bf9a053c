//! Personal data kept out of everything aitl persists. Every text that
//! reaches the training log (and through it the worker's journal and
//! exports) passes the [`Redactor`] first: questions, conversation turns,
//! passages sent to Rank, system prompts, candidates, edited replies,
//! rationales and missing-knowledge references. Each finding is replaced by
//! a typed placeholder (`[EMAIL]`, `[CARD]`, ...) and counted in the record's
//! `redactions`; the live response still carries the original text.
//!
//! What is caught (see `detectors.rs` for the exact patterns):
//! - e-mail addresses;
//! - IBANs (ISO 13616 checksum);
//! - payment card numbers of 13–19 digits, spaced or not, with a network's
//!   prefix and a valid Luhn checksum; a CVV labelled as one, or right after a
//!   card number (after its expiry date, if given);
//! - US SSNs (123-45-6789, as issued), UK National Insurance numbers, and
//!   numbers labelled as an SSN, national id, passport, tax id or driver's
//!   licence;
//! - phone numbers: international (+ and 7–15 digits), domestic with
//!   separators ((555) 123-4567, 555-123-4567, 020 7946 0958), and digit runs
//!   labelled phone, mobile, call me at, ...;
//! - IPv4 and IPv6 addresses;
//! - street addresses in English form (number, capitalised name, a street
//!   suffix, an optional unit) and German form (Hauptstraße 5);
//! - the deployment's own patterns (`[privacy] patterns`).
//!
//! What is not: names of people, cities and postcodes, dates of birth, bare
//! digit runs without separators or a label (a phone number typed as
//! 5551234567), card numbers with other separators, addresses in other
//! forms, and anything split across two texts. Near misses stay on purpose:
//! order and ticket numbers, dates, times, prices, and version strings of
//! fewer than four parts. A digit run that happens to be a valid card or a
//! dashed 3-4-3 order number is redacted: placeholders err toward privacy.

mod detectors;
mod records;

use std::{borrow::Cow, collections::HashMap, ops::Range};

use regex::Regex;

pub use detectors::PiiKind;

use crate::{
    config::PrivacyConfig,
    error::{Error, Result},
};

/// Placeholders by kind name, and how many each record got.
pub type Redactions = HashMap<String, u32>;

/// A deployment's own pattern, found before the built-in ones.
struct Custom {
    placeholder: String,
    name: String,
    regex: Regex,
}

pub struct Redactor {
    enabled: bool,
    custom: Vec<Custom>,
    detectors: Vec<detectors::Detector>,
    /// A CVV right after a card number: separators, an optional expiry date
    /// and label, then three or four digits.
    cvv_after_card: Regex,
}

impl Default for Redactor {
    /// The built-in detectors, on.
    fn default() -> Self {
        Redactor::new(&PrivacyConfig::default()).expect("the defaults are valid")
    }
}

impl Redactor {
    pub fn new(config: &PrivacyConfig) -> Result<Self> {
        let mut custom = Vec::new();
        for (i, pattern) in config.patterns.iter().enumerate() {
            let field = format!("privacy.patterns[{i}]");
            let name = pattern.name.as_str();
            let valid_name = !name.is_empty()
                && name.len() <= 32
                && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !valid_name {
                return Err(Error::InvalidArgument(format!(
                    "config {field}.name {name:?}: use 1 to 32 characters from A-Z, 0-9 and '_' (it becomes the placeholder [{name}])"
                )));
            }
            if PiiKind::ALL.iter().any(|k| k.name() == name) {
                return Err(Error::InvalidArgument(format!(
                    "config {field}.name {name:?} is a built-in kind; choose another name"
                )));
            }
            let regex = Regex::new(&pattern.regex)
                .map_err(|e| Error::InvalidArgument(format!("config {field}.regex does not compile: {e}")))?;
            if regex.is_match("") {
                return Err(Error::InvalidArgument(format!(
                    "config {field}.regex matches the empty text; it must match something"
                )));
            }
            custom.push(Custom { placeholder: format!("[{name}]"), name: name.into(), regex });
        }
        let cvv_after_card = Regex::new(
            r"^[ ,;:/-]{0,3}(?:(?i:exp\w*|valid\w*)?\W{0,3}\d{1,2} ?/ ?\d{2,4}[ ,;]{1,3})?(?:(?i:cvv2?|cvc2?|csc|code)\W{0,3})?(\d{3,4})\b",
        )
        .expect("literal pattern");
        Ok(Redactor { enabled: config.redact, custom, detectors: detectors::built_in(), cvv_after_card })
    }

    /// Redacts nothing: for a deployment that has decided so (`redact = false`).
    pub fn off() -> Self {
        Redactor { enabled: false, ..Redactor::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `text` with each finding replaced by its placeholder; counts added to
    /// `counts`. Redacting a redacted text changes nothing.
    pub fn redact<'a>(&self, text: &'a str, counts: &mut Redactions) -> Cow<'a, str> {
        if !self.enabled || text.is_empty() {
            return Cow::Borrowed(text);
        }
        let spans = self.find(text);
        if spans.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (span, placeholder, name) in spans {
            out.push_str(&text[at..span.start]);
            out.push_str(placeholder);
            *counts.entry(name.to_string()).or_insert(0) += 1;
            at = span.end;
        }
        out.push_str(&text[at..]);
        Cow::Owned(out)
    }

    pub fn redact_in_place(&self, text: &mut String, counts: &mut Redactions) {
        if let Cow::Owned(redacted) = self.redact(text, counts) {
            *text = redacted;
        }
    }

    /// Non-overlapping findings in text order, each with its placeholder
    /// and kind name. Where candidates overlap, the custom patterns win,
    /// then the built-in detectors in their order, then the longer one.
    fn find<'s>(&'s self, text: &str) -> Vec<(Range<usize>, &'s str, &'s str)> {
        let mut candidates: Vec<(Range<usize>, usize)> = Vec::new();
        for (priority, custom) in self.custom.iter().enumerate() {
            candidates.extend(custom.regex.find_iter(text).filter(|m| !m.is_empty()).map(|m| (m.range(), priority)));
        }
        let holds = detectors::Holds::of(text);
        if holds.any() {
            let mut found = Vec::new();
            for (i, detector) in self.detectors.iter().enumerate() {
                found.clear();
                detector.find(text, holds, &mut found);
                if detector.kind == PiiKind::Card {
                    let cvvs: Vec<Range<usize>> = found.iter().filter_map(|card| self.cvv_after(text, card)).collect();
                    let cvv = self.detectors.iter().position(|d| d.kind == PiiKind::Cvv).expect("a CVV detector");
                    candidates.extend(cvvs.into_iter().map(|r| (r, self.custom.len() + cvv)));
                }
                candidates.extend(found.drain(..).map(|r| (r, self.custom.len() + i)));
            }
        }
        candidates.sort_by_key(|(r, priority)| (*priority, std::cmp::Reverse(r.len()), r.start));
        let mut taken: Vec<(Range<usize>, usize)> = Vec::new();
        for (range, priority) in candidates {
            if taken.iter().all(|(t, _)| range.end <= t.start || t.end <= range.start) {
                taken.push((range, priority));
            }
        }
        taken.sort_by_key(|(r, _)| r.start);
        taken
            .into_iter()
            .map(|(range, priority)| match self.custom.get(priority) {
                Some(custom) => (range, custom.placeholder.as_str(), custom.name.as_str()),
                None => {
                    let kind = self.detectors[priority - self.custom.len()].kind;
                    (range, placeholder(kind), kind.name())
                }
            })
            .collect()
    }

    fn cvv_after(&self, text: &str, card: &Range<usize>) -> Option<Range<usize>> {
        let rest = &text[card.end..];
        let group = self.cvv_after_card.captures(rest)?.get(1)?;
        Some(card.end + group.start()..card.end + group.end())
    }
}

fn placeholder(kind: PiiKind) -> &'static str {
    match kind {
        PiiKind::Email => "[EMAIL]",
        PiiKind::Iban => "[IBAN]",
        PiiKind::Card => "[CARD]",
        PiiKind::Cvv => "[CVV]",
        PiiKind::NationalId => "[NATIONAL_ID]",
        PiiKind::Phone => "[PHONE]",
        PiiKind::Ip => "[IP]",
        PiiKind::Address => "[ADDRESS]",
    }
}

#[cfg(test)]
mod tests;
