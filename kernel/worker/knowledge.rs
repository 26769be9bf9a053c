//! Knowledge for the worker: the knowledge base file when no server holds it,
//! or a running server's KnowledgeService (the exact versions interactions
//! showed, by GetKnowledge) while it serves.

use super::datasets::KnowledgeSource;
use crate::{
    error::{Error, Result},
    proto::{
        GetKnowledgeRequest, KnowledgeObject, ListKnowledgeRequest, knowledge_service_client::KnowledgeServiceClient,
    },
    remote::Remote,
};

pub struct ServerKnowledge {
    runtime: tokio::runtime::Runtime,
    client: KnowledgeServiceClient<Remote>,
}

impl ServerKnowledge {
    pub fn connect(server: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
        let channel = runtime.block_on(crate::remote::connect(server, "--server"))?;
        Ok(ServerKnowledge { runtime, client: KnowledgeServiceClient::new(channel) })
    }
}

impl KnowledgeSource for ServerKnowledge {
    fn object(&self, tenant: &str, id: &str, version: Option<u64>) -> Result<KnowledgeObject> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(GetKnowledgeRequest {
            id: id.into(),
            version: version.unwrap_or(0),
            include_deleted: true,
        });
        let tenant = tenant.parse().map_err(|_| Error::InvalidArgument(format!("tenant {tenant:?} in the log")))?;
        request.metadata_mut().insert(crate::tenancy::TENANT_HEADER, tenant);
        self.runtime
            .block_on(client.get_knowledge(request))
            .map(tonic::Response::into_inner)
            .map_err(|s| Error::from_status(format!("GetKnowledge {id} v{version:?}"), &s))
    }

    /// The objects of the tenant the calls act for (the key's in
    /// `AITL_API_KEY`, else the default): over gRPC each call sees one tenant.
    fn live_objects(&self) -> Result<Vec<KnowledgeObject>> {
        let mut client = self.client.clone();
        let mut objects = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListKnowledgeRequest { page_size: 1_000, page_token, ..Default::default() };
            let page = self
                .runtime
                .block_on(client.list_knowledge(request))
                .map_err(|s| Error::from_status("ListKnowledge", &s))?
                .into_inner();
            objects.extend(page.objects);
            if page.next_page_token.is_empty() {
                return Ok(objects);
            }
            page_token = page.next_page_token;
        }
    }
}
