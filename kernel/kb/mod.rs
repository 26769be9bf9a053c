//! The unified knowledge base: policies, past cases and FAQs that Retrieve
//! searches and Generate cites. Objects are versioned and every version is
//! kept, so an interaction's `(knowledge_id, version)` always resolves to the
//! text that was shown.

mod dstc11;
mod jsonl;
mod store;

pub use dstc11::read_dstc11;
pub use jsonl::read_jsonl;
pub use store::{KbError, KnowledgeStore, ListPage, UpsertOutcome};
