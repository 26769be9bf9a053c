//! KnowledgeService: manage the knowledge base.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{AppState, blocking, convert};
use crate::{
    error::Error,
    proto::{
        DeleteKnowledgeRequest, DeleteKnowledgeResponse, GetKnowledgeRequest, KnowledgeObject, ListKnowledgeRequest,
        ListKnowledgeResponse, UpsertKnowledgeRequest, UpsertKnowledgeResponse,
        knowledge_service_server::KnowledgeService,
    },
    tenancy,
};

pub struct Knowledge {
    state: Arc<AppState>,
}

impl Knowledge {
    pub fn new(state: Arc<AppState>) -> Self {
        Knowledge { state }
    }
}

#[tonic::async_trait]
impl KnowledgeService for Knowledge {
    async fn upsert_knowledge(
        &self,
        request: Request<Streaming<UpsertKnowledgeRequest>>,
    ) -> Result<Response<UpsertKnowledgeResponse>, Status> {
        let tenant = tenancy::of(&request);
        let mut stream = request.into_inner();
        let mut totals = UpsertKnowledgeResponse::default();
        while let Some(batch) = stream.message().await? {
            let n = totals.batches;
            let committed = |e: Error| -> Status {
                let status = Status::from(e);
                Status::new(
                    status.code(),
                    format!("batch {n}: {} ({n} earlier batches were committed)", status.message()),
                )
            };
            convert::check_upsert_batch(&batch.objects).map_err(committed)?;
            let _writes = self.state.knowledge_writes.read().await;
            let kb = self.state.kb.clone();
            let owner = tenant.clone();
            let (outcome, written) =
                blocking(move || Ok(kb.upsert_batch(&owner, batch.objects)?)).await.map_err(committed)?;
            if let Some(semantic) = self.state.semantic.get() {
                // Searchable before the call returns: a Retrieve right after sees it.
                semantic.index_objects(&tenant, &written).await.map_err(|e| {
                    let status = Status::from(e);
                    Status::new(
                        status.code(),
                        format!(
                            "batch {n} was stored but could not be embedded: {} ({} batches committed); \
                             it becomes searchable when the server next starts and embeds what it missed",
                            status.message(),
                            n + 1
                        ),
                    )
                })?;
            }
            totals.inserted += outcome.inserted;
            totals.updated += outcome.updated;
            totals.unchanged += outcome.unchanged;
            totals.batches += 1;
        }
        Ok(Response::new(totals))
    }

    async fn delete_knowledge(
        &self,
        request: Request<DeleteKnowledgeRequest>,
    ) -> Result<Response<DeleteKnowledgeResponse>, Status> {
        let tenant = tenancy::of(&request);
        let id = request.into_inner().id;
        convert::check_id("id", &id, convert::MAX_ID_BYTES)?;
        let kb = self.state.kb.clone();
        let (removed, owner) = (id.clone(), tenant.clone());
        let _writes = self.state.knowledge_writes.read().await;
        let version = blocking(move || Ok(kb.delete(&owner, &id)?)).await?;
        if let Some(semantic) = self.state.semantic.get() {
            semantic.remove(&tenant, &removed);
        }
        Ok(Response::new(DeleteKnowledgeResponse { version }))
    }

    async fn get_knowledge(&self, request: Request<GetKnowledgeRequest>) -> Result<Response<KnowledgeObject>, Status> {
        let tenant = tenancy::of(&request);
        let req = request.into_inner();
        convert::check_id("id", &req.id, convert::MAX_ID_BYTES)?;
        let kb = self.state.kb.clone();
        let object = blocking(move || Ok(kb.get(&tenant, &req.id, req.version, req.include_deleted)?)).await?;
        Ok(Response::new(object))
    }

    async fn list_knowledge(
        &self,
        request: Request<ListKnowledgeRequest>,
    ) -> Result<Response<ListKnowledgeResponse>, Status> {
        let tenant = tenancy::of(&request);
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => convert::DEFAULT_PAGE_SIZE,
            n if n > convert::MAX_PAGE_SIZE => {
                return Err(
                    Error::invalid("page_size", format!("is {n}; the limit is {}", convert::MAX_PAGE_SIZE)).into()
                );
            }
            n => n,
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(super::page_token::decode(token)?),
        };
        convert::check_filter("filter", req.filter.as_ref())?;
        let kb = self.state.kb.clone();
        let page = blocking(move || {
            let filter = req.filter.unwrap_or_default();
            Ok(kb.list(&tenant, after.as_deref(), page_size as usize, &filter, req.include_deleted)?)
        })
        .await?;
        Ok(Response::new(ListKnowledgeResponse {
            objects: page.objects,
            next_page_token: page.next_after.as_deref().map(super::page_token::encode).unwrap_or_default(),
        }))
    }
}
