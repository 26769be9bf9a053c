use super::*;
use crate::config::RedactionPattern;

fn redacted(text: &str) -> (String, Redactions) {
    let mut counts = Redactions::new();
    let out = Redactor::default().redact(text, &mut counts).into_owned();
    (out, counts)
}

fn counts(pairs: &[(&str, u32)]) -> Redactions {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

/// Each kind on its own, in the forms customers type it.
#[test]
fn each_kind_is_replaced_by_its_placeholder() {
    let cases = [
        ("mail me at jane.doe+orders@example.co.uk please", "mail me at [EMAIL] please", "EMAIL"),
        ("IBAN GB82 WEST 1234 5698 7654 32 for the refund", "IBAN [IBAN] for the refund", "IBAN"),
        ("IBAN DE89370400440532013000.", "IBAN [IBAN].", "IBAN"),
        ("card 4111 1111 1111 1111 declined", "card [CARD] declined", "CARD"),
        ("card 4111-1111-1111-1111 declined", "card [CARD] declined", "CARD"),
        ("amex 378282246310005 ok", "amex [CARD] ok", "CARD"),
        ("my cvv: 737", "my cvv: [CVV]", "CVV"),
        ("security code is 1234", "security code is [CVV]", "CVV"),
        ("SSN 123-45-6789 on file", "SSN [NATIONAL_ID] on file", "NATIONAL_ID"),
        ("ssn: 123456789", "ssn: [NATIONAL_ID]", "NATIONAL_ID"),
        ("NI number AB 12 34 56 C", "NI number [NATIONAL_ID]", "NATIONAL_ID"),
        ("passport number X1234567.", "passport number [NATIONAL_ID].", "NATIONAL_ID"),
        ("call +44 20 7946 0958 today", "call [PHONE] today", "PHONE"),
        ("call +1 (555) 123-4567", "call [PHONE]", "PHONE"),
        ("or (555) 123-4567 evenings", "or [PHONE] evenings", "PHONE"),
        ("try 555-123-4567", "try [PHONE]", "PHONE"),
        ("try 555.123.4567", "try [PHONE]", "PHONE"),
        ("mobile: 07700900123", "mobile: [PHONE]", "PHONE"),
        ("call me at 5551234567", "call me at [PHONE]", "PHONE"),
        ("from 203.0.113.42 at login", "from [IP] at login", "IP"),
        ("from 2001:db8::8a2e:370:7334 at login", "from [IP] at login", "IP"),
        ("ship to 221B Baker Street, London", "ship to [ADDRESS], London", "ADDRESS"),
        ("at 1600 Pennsylvania Avenue, Apt 4B now", "at [ADDRESS] now", "ADDRESS"),
        ("Lieferung an Hauptstraße 5 bitte", "Lieferung an [ADDRESS] bitte", "ADDRESS"),
    ];
    for (text, want, kind) in cases {
        let (out, found) = redacted(text);
        assert_eq!(out, want, "{text:?}");
        assert_eq!(found, counts(&[(kind, 1)]), "{text:?}");
    }
}

/// A real-looking message with every kind at once, as the hardening probe
/// sent it.
#[test]
fn a_message_full_of_personal_data() {
    let text = "Hi, I'm Jane (jane.doe@example.com, +1 415-555-0132). Card 5555 5555 5555 4444 exp 09/27 cvv 123 \
                was charged twice. SSN 078-05-1120 if you need it. IBAN: FR14 2004 1010 0505 0001 3M02 606. \
                I live at 42 Elm Street, Springfield. Logged in from 198.51.100.7.";
    let (out, found) = redacted(text);
    assert_eq!(
        out,
        "Hi, I'm Jane ([EMAIL], [PHONE]). Card [CARD] exp 09/27 cvv [CVV] was charged twice. SSN [NATIONAL_ID] if \
         you need it. IBAN: [IBAN]. I live at [ADDRESS], Springfield. Logged in from [IP]."
    );
    let want = [("EMAIL", 1), ("PHONE", 1), ("CARD", 1), ("CVV", 1), ("NATIONAL_ID", 1), ("IBAN", 1)];
    assert_eq!(found, counts(&[want.as_slice(), &[("ADDRESS", 1), ("IP", 1)]].concat()));
}

#[test]
fn a_cvv_right_after_the_card_number_is_caught() {
    for (text, want) in [
        ("4111 1111 1111 1111 123", "[CARD] [CVV]"),
        ("4111111111111111, 09/27, 123", "[CARD], 09/27, [CVV]"),
        ("4111111111111111 exp 09/2027 code 4321 thanks", "[CARD] exp 09/2027 code [CVV] thanks"),
    ] {
        assert_eq!(redacted(text).0, want, "{text:?}");
    }
}

/// Numbers that look alike and must stay: they are what support is about.
#[test]
fn near_misses_stay() {
    for text in [
        "order #A-48213-77 arrived late",
        "order 100234987 and order 4417-2209",
        "ticket 2024-0456, invoice INV-2024-00123",
        "delivered 2024-03-15 at 14:30:05, or 15/03/2024, or March 3, 2024",
        "it cost $1,299.00 (1.299,00 EUR) for 2 nights",
        "room 312 on floor 3, booking ref 7GH2KQ",
        "version 2.10.3 of the app, build 10:30",
        "card ending in 4242 was charged",
        "tracking 1Z999AA10123456784 shows delivered",
        "the 4111111111111112 test number fails Luhn",
        "I ordered 2 Large Pizzas and 3 Cokes",
        "a::b is not an address, nor is 10:30:15",
    ] {
        let (out, found) = redacted(text);
        assert_eq!(out, text, "{text:?} must stay: {found:?}");
    }
}

#[test]
fn redaction_is_idempotent_and_off_means_off() {
    let text = "jane@example.com 4111 1111 1111 1111 cvv 123 +44 20 7946 0958";
    let (once, _) = redacted(text);
    let (twice, found) = redacted(&once);
    assert_eq!(once, twice);
    assert!(found.is_empty());
    let mut counts = Redactions::new();
    assert_eq!(Redactor::off().redact(text, &mut counts), text);
    assert!(counts.is_empty());
}

#[test]
fn configured_patterns_come_first_and_bad_ones_are_refused() {
    let config = |name: &str, regex: &str| PrivacyConfig {
        redact: true,
        patterns: vec![RedactionPattern { name: name.into(), regex: regex.into() }],
    };
    let redactor = Redactor::new(&config("CUSTOMER_NO", r"CU-\d{8}")).unwrap();
    let mut counts = Redactions::new();
    assert_eq!(redactor.redact("I am CU-12345678, mail a@b.io", &mut counts), "I am [CUSTOMER_NO], mail [EMAIL]");
    assert_eq!(counts, super::tests::counts(&[("CUSTOMER_NO", 1), ("EMAIL", 1)]));
    for (name, regex, says) in [
        ("customer", r"x", "privacy.patterns[0].name"),
        ("EMAIL", r"x", "is a built-in kind"),
        ("BAD", r"(", "privacy.patterns[0].regex does not compile"),
        ("EMPTY", r"x*", "matches the empty text"),
    ] {
        let err = Redactor::new(&config(name, regex)).err().expect("refused").to_string();
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn interaction_and_annotation_fields_are_redacted_and_ids_kept() {
    use crate::proto::{
        Adoption, Candidate, ConversationTurn, ExternalReference, GenerateRequest, InteractionRecord, MissingKnowledge,
        annotation::Kind, interaction_record::Request, missing_knowledge::Source,
    };
    let turn = |text: &str| ConversationTurn { speaker: 1, text: text.into() };
    let mut record = InteractionRecord {
        interaction_id: "ix-4111111111111111".into(),
        request: Some(Request::Generate(GenerateRequest {
            conversation: vec![turn("my mail is a@b.io"), turn("card 4111 1111 1111 1111")],
            system_prompt: "Answer kindly.".into(),
            ..Default::default()
        })),
        candidates: vec![Candidate {
            candidate_id: "ix-1/c0".into(),
            text: "We wrote to a@b.io.".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Redactor::default().interaction(&mut record);
    assert_eq!(record.interaction_id, "ix-4111111111111111", "ids are not text");
    let Some(Request::Generate(g)) = &record.request else { panic!() };
    assert_eq!(g.conversation[0].text, "my mail is [EMAIL]");
    assert_eq!(g.conversation[1].text, "card [CARD]");
    assert_eq!(record.candidates[0].text, "We wrote to [EMAIL].");
    assert_eq!(record.redactions, counts(&[("EMAIL", 2), ("CARD", 1)]));

    let mut adoption = crate::proto::Annotation {
        agent_id: "agent-555-123-4567".into(),
        kind: Some(Kind::Adoption(Adoption {
            sent_text: "Refund sent to IBAN DE89370400440532013000.".into(),
            rationale: "customer called from 555-123-4567".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let found = Redactor::default().annotation(&mut adoption);
    assert_eq!(adoption.agent_id, "agent-555-123-4567");
    let Some(Kind::Adoption(a)) = &adoption.kind else { panic!() };
    assert_eq!(
        (a.sent_text.as_str(), a.rationale.as_str()),
        ("Refund sent to IBAN [IBAN].", "customer called from [PHONE]")
    );
    assert_eq!(found, counts(&[("IBAN", 1), ("PHONE", 1)]));

    let mut missing = crate::proto::Annotation {
        kind: Some(Kind::MissingKnowledge(MissingKnowledge {
            source: Some(Source::External(ExternalReference {
                title: "Ticket from bob@corp.com".into(),
                uri: "https://crm.example/tickets/88?ip=10.0.0.7".into(),
                excerpt: "ship to 12 Main Street".into(),
            })),
            note: String::new(),
        })),
        ..Default::default()
    };
    let found = Redactor::default().annotation(&mut missing);
    assert_eq!(found, counts(&[("EMAIL", 1), ("IP", 1), ("ADDRESS", 1)]));
}
