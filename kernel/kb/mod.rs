//! The unified knowledge base: policies, past cases and FAQs that Retrieve
//! searches and Generate cites. Objects are versioned and every version is
//! kept, so an interaction's `(knowledge_id, version)` always resolves to the
//! text that was shown.

pub mod device_index;
mod dstc11;
pub mod index;
pub mod jsonl;
mod scan;
pub mod semantic;
mod store;

pub use dstc11::read_dstc11;
pub use jsonl::read_jsonl;
pub use semantic::{QueryComposition, SemanticIndex};
pub use store::{KbError, KnowledgeStore, ListPage, StoredObject, UpsertOutcome};
