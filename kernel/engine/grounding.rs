//! The grounded prompt Generate sends to the decoder, and the citations read
//! back from a candidate. Knowledge objects are numbered in ranked order and
//! labelled with their ids; the model is asked to cite by number, and `[n]`
//! (or `[n, m]`) in the reply maps back to knowledge ids.

use crate::{
    model::chat::Role,
    proto::{ConversationTurn, KnowledgeObject, Speaker},
};

pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a customer-support copilot. Write the agent's next reply to the \
customer. Use only the numbered knowledge below; cite each fact with its number in brackets, like [1]. If the \
knowledge does not answer the question, say what is missing instead of guessing.";

/// System message (instructions + numbered knowledge), then the conversation
/// with the customer as the user and the agent as the assistant.
pub fn messages(system: &str, knowledge: &[KnowledgeObject], conversation: &[ConversationTurn]) -> Vec<(Role, String)> {
    let mut system = system.trim().to_string();
    if !knowledge.is_empty() {
        system.push_str("\n\nKnowledge:");
        for (i, object) in knowledge.iter().enumerate() {
            let title = if object.title.is_empty() { String::new() } else { format!("{}: ", object.title.trim()) };
            system.push_str(&format!("\n[{}] (id {}) {title}{}", i + 1, object.id, object.text.trim()));
        }
    }
    let mut out = vec![(Role::System, system)];
    for turn in conversation {
        let role = if turn.speaker == Speaker::Agent as i32 { Role::Assistant } else { Role::User };
        out.push((role, turn.text.trim().to_string()));
    }
    out
}

/// Knowledge ids cited as `[n]` or `[n, m, …]` in `text`, in order of first
/// citation; numbers outside `1..=ids.len()` are ignored.
pub fn citations(text: &str, ids: &[String]) -> Vec<String> {
    let mut cited: Vec<String> = Vec::new();
    // The innermost brackets count: "[[3]]" cites 3.
    let mut open = None;
    for (i, c) in text.char_indices() {
        match c {
            '[' => open = Some(i + 1),
            ']' => {
                let Some(start) = open.take() else { continue };
                let numbers: Option<Vec<usize>> =
                    text[start..i].split(',').map(|n| n.trim().parse::<usize>().ok()).collect();
                for n in numbers.unwrap_or_default() {
                    if let Some(id) = n.checked_sub(1).and_then(|i| ids.get(i))
                        && !cited.contains(id)
                    {
                        cited.push(id.clone());
                    }
                }
            }
            _ => {}
        }
    }
    cited
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(id: &str, title: &str, text: &str) -> KnowledgeObject {
        KnowledgeObject { id: id.into(), title: title.into(), text: text.into(), ..Default::default() }
    }

    #[test]
    fn knowledge_is_numbered_and_labelled_and_turns_keep_their_speakers() {
        let turns = [
            ConversationTurn { speaker: Speaker::Customer as i32, text: "My parcel is late.".into() },
            ConversationTurn { speaker: Speaker::Agent as i32, text: "Which order? ".into() },
            ConversationTurn { speaker: Speaker::Customer as i32, text: "#4821".into() },
        ];
        let knowledge =
            [object("ship-1", "Shipping", "Parcels take 3 days."), object("ref-2", "", "Refunds: 14 days.")];
        let m = messages("Be brief.", &knowledge, &turns);
        assert_eq!(m[0].0, Role::System);
        assert_eq!(
            m[0].1,
            "Be brief.\n\nKnowledge:\n[1] (id ship-1) Shipping: Parcels take 3 days.\n[2] (id ref-2) Refunds: 14 days."
        );
        let roles: Vec<Role> = m[1..].iter().map(|(r, _)| *r).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::User]);
        assert_eq!(m[2].1, "Which order?");
        assert_eq!(messages("Be brief.", &[], &turns[..1])[0].1, "Be brief.");
    }

    #[test]
    fn citations_map_numbers_to_ids_in_first_cited_order() {
        let ids: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(citations("Yes [2]. Also [1, 3] and again [2].", &ids), ["b", "a", "c"]);
        assert_eq!(citations("See [4], [0], [x], [1", &ids), Vec::<String>::new());
        assert_eq!(citations("[[3]]", &ids), ["c"]);
    }
}
