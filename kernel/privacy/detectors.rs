//! The built-in detectors of personal data. Each is a pattern that finds
//! candidates and, where the data has one, the check that confirms them
//! (Luhn for cards, ISO 13616's mod 97 for IBANs, the SSA's rules for US
//! SSNs, the address parsers of `std::net`), so that numbers which merely
//! look alike (order numbers, dates, prices) stay.

use std::{net::Ipv4Addr, net::Ipv6Addr, ops::Range};

use regex::Regex;

/// What a detector finds, and the placeholder it leaves: `[EMAIL]` and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiKind {
    Email,
    Iban,
    Card,
    Cvv,
    NationalId,
    Phone,
    Ip,
    Address,
}

impl PiiKind {
    pub const ALL: [PiiKind; 8] = [
        PiiKind::Email,
        PiiKind::Iban,
        PiiKind::Card,
        PiiKind::Cvv,
        PiiKind::NationalId,
        PiiKind::Phone,
        PiiKind::Ip,
        PiiKind::Address,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PiiKind::Email => "EMAIL",
            PiiKind::Iban => "IBAN",
            PiiKind::Card => "CARD",
            PiiKind::Cvv => "CVV",
            PiiKind::NationalId => "NATIONAL_ID",
            PiiKind::Phone => "PHONE",
            PiiKind::Ip => "IP",
            PiiKind::Address => "ADDRESS",
        }
    }
}

/// How a candidate is confirmed; some checks narrow it (a card number
/// followed by its CVV matches as one digit run).
#[derive(Debug, Clone, Copy)]
enum Check {
    None,
    Luhn,
    Iban,
    Ssn,
    Nino,
    /// 7 to 15 digits (E.164's longest), narrowed to a separator.
    PhoneDigits,
    /// A national id's value needs digits in it.
    HasDigits,
    Ipv4,
    Ipv6,
}

/// A character the text must hold for a detector to have a chance: most
/// texts hold no digit, and skipping them keeps redaction cheap.
#[derive(Debug, Clone, Copy)]
enum Needs {
    Digit,
    At,
    Colon,
}

pub(super) struct Detector {
    pub kind: PiiKind,
    regex: Regex,
    /// The capture group that is the personal data (0: the whole match).
    group: usize,
    check: Check,
    needs: Needs,
}

/// Street suffixes of English-language addresses.
const STREET: &str = "Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|\
                      Square|Sq|Parkway|Pkwy|Highway|Hwy|Circle|Close|Crescent|Gardens|Row|Walk";

/// In priority order: where two candidates overlap, the earlier detector wins.
pub(super) fn built_in() -> Vec<Detector> {
    let d = |kind, pattern: &str, group, check, needs| Detector {
        kind,
        regex: Regex::new(pattern).expect("built-in patterns compile"),
        group,
        check,
        needs,
    };
    vec![
        d(PiiKind::Email, r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b", 0, Check::None, Needs::At),
        d(PiiKind::Iban, r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", 0, Check::Iban, Needs::Digit),
        d(PiiKind::Card, r"\b\d(?:[ -]?\d){12,22}\b", 0, Check::Luhn, Needs::Digit),
        d(
            PiiKind::Cvv,
            r"(?i:\b(?:cvv2?|cvc2?|csc|cid|security code|card code|verification code))\W{0,3}(?i:is\W{0,2})?(\d{3,4})\b",
            1,
            Check::None,
            Needs::Digit,
        ),
        d(PiiKind::NationalId, r"\b\d{3}-\d{2}-\d{4}\b", 0, Check::Ssn, Needs::Digit),
        d(PiiKind::NationalId, r"\b[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b", 0, Check::Nino, Needs::Digit),
        d(
            PiiKind::NationalId,
            r"(?i:\b(?:ssn|social security(?: number| no\.?)?|national (?:id|insurance)(?: number| no\.?)?|passport(?: number| no\.?)?|tax id|id number|driver'?s licen[cs]e(?: number| no\.?)?))\W{0,4}(?i:is\W{0,2})?(\d[\d -]{3,14}\d|[A-Z]{1,2}\d{6,9}[A-Z]?)\b",
            1,
            Check::HasDigits,
            Needs::Digit,
        ),
        // Before phones: a labelled digit run with dots may be an IPv4 address.
        d(PiiKind::Ip, r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", 0, Check::Ipv4, Needs::Digit),
        d(PiiKind::Ip, r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}", 0, Check::Ipv6, Needs::Colon),
        d(PiiKind::Phone, r"\+\d(?:[ .()-]{0,2}\d){6,16}\b", 0, Check::PhoneDigits, Needs::Digit),
        d(
            PiiKind::Phone,
            r"(?i:\b(?:phone|tel|telephone|mobile|cell|fax|whatsapp|call me|text me|reach me))\W{0,6}(?i:at|on)?\W{0,3}(\+?\d(?:[ .()-]{0,2}\d){6,16})\b",
            1,
            Check::PhoneDigits,
            Needs::Digit,
        ),
        d(
            PiiKind::Phone,
            r"(?:\(\d{2,5}\) ?|\b\d{2,5}[ -])\d{3,4}[ -]\d{3,4}\b|\b\d{3}\.\d{3}\.\d{4}\b",
            0,
            Check::PhoneDigits,
            Needs::Digit,
        ),
        d(
            PiiKind::Address,
            &format!(
                r"\b\d{{1,5}}[A-Za-z]?(?:-\d{{1,5}})? (?:[A-Z][A-Za-z'-]*\.? ){{1,4}}(?:{STREET})\b\.?(?:,? (?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|#)\.? ?[A-Za-z0-9-]+)?"
            ),
            0,
            Check::None,
            Needs::Digit,
        ),
        d(
            PiiKind::Address,
            r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee) \d{1,4}[a-z]?\b",
            0,
            Check::None,
            Needs::Digit,
        ),
    ]
}

/// What the text holds of the characters detectors need.
#[derive(Debug, Clone, Copy)]
pub(super) struct Holds {
    digit: bool,
    at: bool,
    colon: bool,
}

impl Holds {
    pub fn of(text: &str) -> Self {
        let bytes = text.as_bytes();
        Holds { digit: bytes.iter().any(u8::is_ascii_digit), at: bytes.contains(&b'@'), colon: bytes.contains(&b':') }
    }

    pub fn any(self) -> bool {
        self.digit || self.at || self.colon
    }
}

impl Detector {
    /// The confirmed spans (byte ranges) of this detector's kind in `text`.
    pub fn find(&self, text: &str, holds: Holds, found: &mut Vec<Range<usize>>) {
        let possible = match self.needs {
            Needs::Digit => holds.digit,
            Needs::At => holds.at,
            Needs::Colon => holds.colon && holds.digit,
        };
        if !possible {
            return;
        }
        for captures in self.regex.captures_iter(text) {
            let Some(m) = captures.get(self.group) else { continue };
            if let Some(span) = confirm(self.check, text, m.range()) {
                found.push(span);
            }
        }
    }
}

fn confirm(check: Check, text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = &text[span.clone()];
    let start = span.start;
    let shift = |r: Range<usize>| start + r.start..start + r.end;
    match check {
        Check::None => Some(span),
        Check::Luhn => longest_valid(candidate, 13..=19, card_number).map(shift),
        Check::PhoneDigits => longest_valid(candidate, 7..=15, |_| true).map(shift),
        Check::Iban => iban(candidate).then_some(span),
        Check::Ssn => ssn(candidate).then_some(span),
        Check::Nino => nino(candidate).then_some(span),
        Check::HasDigits => (candidate.bytes().filter(u8::is_ascii_digit).count() >= 4).then_some(span),
        Check::Ipv4 => candidate.parse::<Ipv4Addr>().is_ok().then_some(span),
        Check::Ipv6 => ipv6(text, span),
    }
}

/// The longest prefix of a digit run (digits with separators) that ends
/// after a digit, before a separator or the end, holds a digit count in
/// `digits` and passes `valid`: "4111 1111 1111 1111 123" is a card number
/// and then three more digits.
fn longest_valid(
    run: &str,
    digits: std::ops::RangeInclusive<usize>,
    valid: impl Fn(&[u8]) -> bool,
) -> Option<Range<usize>> {
    let bytes = run.as_bytes();
    let mut seen = Vec::with_capacity(bytes.len());
    let mut ends = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() {
            seen.push(b - b'0');
            let at_boundary = bytes.get(i + 1).is_none_or(|next| !next.is_ascii_digit());
            if at_boundary && digits.contains(&seen.len()) {
                ends.push((i + 1, seen.len()));
            }
        }
    }
    ends.into_iter().rev().find(|&(_, n)| valid(&seen[..n])).map(|(end, _)| 0..end)
}

/// Luhn's checksum and a prefix that card networks issue (Visa, Mastercard,
/// American Express, Discover, JCB, Diners Club, UnionPay, Maestro).
fn card_number(digits: &[u8]) -> bool {
    let prefix = |n: usize| digits[..n].iter().fold(0u32, |v, d| v * 10 + *d as u32);
    let issued = match digits[0] {
        4 => true,
        2 => (2221..=2720).contains(&prefix(4)),
        3 => {
            matches!(prefix(2), 34 | 36 | 37 | 38 | 39) || (300..=305).contains(&prefix(3)) || {
                (3528..=3589).contains(&prefix(4))
            }
        }
        5 => (50..=58).contains(&prefix(2)),
        6 => prefix(4) == 6011 || matches!(prefix(2), 62 | 65 | 67) || (644..=649).contains(&prefix(3)),
        _ => false,
    };
    issued && luhn(digits)
}

pub(super) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = d as u32;
            if i % 2 == 1 { if d * 2 > 9 { d * 2 - 9 } else { d * 2 } } else { d }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616: 15 to 34 characters, country letters, and the remainder 1
/// modulo 97 once the first four characters move to the end.
fn iban(candidate: &str) -> bool {
    let compact: Vec<u8> = candidate.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let mut remainder = 0u32;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        let value = match b {
            b'0'..=b'9' => (b - b'0') as u32,
            b'A'..=b'Z' => (b - b'A') as u32 + 10,
            _ => return false,
        };
        remainder = if value >= 10 { (remainder * 100 + value) % 97 } else { (remainder * 10 + value) % 97 };
    }
    remainder == 1
}

/// The SSA never issues area 000, 666 or 900–999, group 00 or serial 0000.
fn ssn(candidate: &str) -> bool {
    let parts: Vec<&str> = candidate.split('-').collect();
    let [area, group, serial] = parts.as_slice() else { return false };
    let area: u32 = area.parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && *group != "00" && *serial != "0000"
}

/// A UK National Insurance number: prefixes HMRC does not use are refused.
fn nino(candidate: &str) -> bool {
    let compact: Vec<u8> = candidate.bytes().filter(|b| *b != b' ').collect();
    let (first, second) = (compact[0], compact[1]);
    let allowed_first = !matches!(first, b'D' | b'F' | b'I' | b'Q' | b'U' | b'V');
    let allowed_second = !matches!(second, b'D' | b'F' | b'I' | b'O' | b'Q' | b'U' | b'V');
    let prefix = &compact[..2];
    allowed_first && allowed_second && !matches!(prefix, b"BG" | b"GB" | b"NK" | b"KN" | b"TN" | b"NT" | b"ZZ")
}

/// An IPv6 address as `std::net` parses it, not inside a longer word, and
/// with at least two groups that hold a digit (so "a::b" in prose and clock
/// times such as 10:30:15 stay).
fn ipv6(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = text.as_bytes();
    if (span.start > 0 && word(bytes[span.start - 1])) || bytes.get(span.end).is_some_and(|&b| word(b)) {
        return None;
    }
    let candidate = &text[span.clone()];
    let groups_with_digits = candidate.split(':').filter(|g| g.bytes().any(|b| b.is_ascii_digit())).count();
    (groups_with_digits >= 2 && candidate.parse::<Ipv6Addr>().is_ok()).then_some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_on_hand_computed_values() {
        let digits = |s: &str| s.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect::<Vec<_>>();
        // 4111 1111 1111 1111: doubled ones sum to 8 × 2 + 8 × 1 = 24, +6 = 30.
        assert!(luhn(&digits("4111111111111111")));
        assert!(!luhn(&digits("4111111111111112")));
        assert!(card_number(&digits("378282246310005")), "Amex test number");
        assert!(!card_number(&digits("9111111111111111")), "no network issues 9");
        assert!(iban("GB82 WEST 1234 5698 7654 32"));
        assert!(iban("DE89370400440532013000"));
        assert!(!iban("DE89370400440532013001"));
        assert!(ssn("123-45-6789") && !ssn("666-45-6789") && !ssn("123-00-6789") && !ssn("912-45-6789"));
        assert!(!nino("QQ123456C") && nino("AB123456C") && !nino("GB123456A"));
        assert_eq!(longest_valid("4111 1111 1111 1111 123", 13..=19, card_number), Some(0..19));
    }
}
