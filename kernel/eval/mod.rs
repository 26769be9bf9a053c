//! Offline evaluation: data sets with relevance labels, the metrics the
//! paper reports, and the runners behind `aitl eval`.

pub mod dataset;
pub mod dstc11;
pub mod metrics;
pub mod retrieval;
