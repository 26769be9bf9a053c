//! FlywheelService: what the worker learned, for the people who act on it.

use std::{path::PathBuf, sync::Arc};

use tonic::{Request, Response, Status};

use crate::{
    error::Error,
    proto::{
        GetServingModelsRequest, GetServingModelsResponse, KnowledgeGap, ListKnowledgeGapsRequest,
        ListKnowledgeGapsResponse, ServingModel, flywheel_service_server::FlywheelService,
    },
    worker::gaps::read_snapshot,
};

const DEFAULT_GAPS: u32 = 100;
const MAX_GAPS: u32 = 1_000;

pub struct Flywheel {
    worker_dir: PathBuf,
    state: Arc<super::AppState>,
}

impl Flywheel {
    pub fn new(worker_dir: PathBuf, state: Arc<super::AppState>) -> Self {
        Flywheel { worker_dir, state }
    }
}

fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: ms.div_euclid(1_000), nanos: (ms.rem_euclid(1_000) * 1_000_000) as i32 })
}

#[tonic::async_trait]
impl FlywheelService for Flywheel {
    async fn get_serving_models(
        &self,
        _: Request<GetServingModelsRequest>,
    ) -> Result<Response<GetServingModelsResponse>, Status> {
        let models = self
            .state
            .serving
            .get()
            .into_iter()
            .map(|(role, s)| ServingModel {
                role: role.name().into(),
                version: s.version,
                registry_version: s.registry_version.unwrap_or_default(),
                source: s.source,
                challenger: s.challenger.unwrap_or_default(),
                switching_to: s.switching_to.unwrap_or_default(),
                last_error: s.last_error.unwrap_or_default(),
            })
            .collect();
        let challenger_share = self.state.generators.get().map_or(0.0, |g| g.challenger_share);
        Ok(Response::new(GetServingModelsResponse { models, challenger_share }))
    }

    async fn list_knowledge_gaps(
        &self,
        request: Request<ListKnowledgeGapsRequest>,
    ) -> Result<Response<ListKnowledgeGapsResponse>, Status> {
        let tenant = crate::tenancy::of(&request);
        let limit = match request.into_inner().limit {
            0 => DEFAULT_GAPS,
            n if n <= MAX_GAPS => n,
            n => return Err(Error::invalid("limit", format!("{n} is above the maximum of {MAX_GAPS}")).into()),
        };
        let dir = self.worker_dir.clone();
        let snapshot = tokio::task::spawn_blocking(move || read_snapshot(&dir))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let gaps: Vec<_> = snapshot.gaps.into_iter().filter(|g| g.tenant == tenant).collect();
        Ok(Response::new(ListKnowledgeGapsResponse {
            total: gaps.len() as u32,
            gaps: gaps
                .into_iter()
                .take(limit as usize)
                .map(|g| KnowledgeGap {
                    key: g.key,
                    knowledge_id: g.knowledge_id.unwrap_or_default(),
                    title: g.title,
                    uri: g.uri,
                    reports: g.reports as u32,
                    immediate_reports: g.immediate_reports as u32,
                    agent_ids: g.agents.iter().map(|a| crate::tenancy::unscoped(a).to_string()).collect(),
                    example_queries: g.example_queries,
                    first_reported_at: timestamp(g.first_ms),
                    last_reported_at: timestamp(g.last_ms),
                })
                .collect(),
            updated_at: timestamp(snapshot.updated_ms),
            log_sequence: snapshot.log_sequence,
        }))
    }
}
