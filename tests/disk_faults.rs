//! A failing disk: the call fails with a clear status, health turns
//! NOT_SERVING, nothing acknowledged is lost, and the server recovers when
//! the disk does.

mod common;

use std::time::Duration;

use aitl::{proto::SubmitAnnotationRequest, trainlog::Fault};
use common::*;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

async fn status_of(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status
}

#[tokio::test]
async fn failing_disk_is_reported_and_recovered_from_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (mut support, _) = clients(&server).await;
    let mut health = HealthClient::new(channel(&server).await);
    let ix = seed_generate(&server, vec![knowledge("k1", "Refunds.")]).await;
    let submit = |id: &str| SubmitAnnotationRequest { annotation: Some(preference(id, &ix, "")) };

    let mut acked = Vec::new();
    for i in 0..5 {
        support.submit_annotation(submit(&format!("before-{i}"))).await.unwrap();
        acked.push(format!("before-{i}"));
    }

    for (fault, code, words) in [
        (Fault::WriteNoSpace, Code::ResourceExhausted, "disk is full"),
        (Fault::WriteIo, Code::Unavailable, "cannot write"),
        (Fault::SyncIo, Code::Unavailable, "cannot write"),
    ] {
        server.state.log.faults().set(fault);
        let status = support.submit_annotation(submit(&format!("during-{fault:?}"))).await.unwrap_err();
        assert_eq!(status.code(), code, "{fault:?}: {status:?}");
        assert!(status.message().contains(words), "{}", status.message());
        assert_eq!(status_of(&mut health, "").await, ServingStatus::NotServing as i32);
        assert_eq!(status_of(&mut health, "aitl.v1.SupportService").await, ServingStatus::NotServing as i32);
        assert_eq!(status_of(&mut health, "aitl.v1.KnowledgeService").await, ServingStatus::Serving as i32);
        // The failed annotation was not acknowledged, so its id stays free.
        server.state.log.faults().set(Fault::None);
        let mut recovered = false;
        for _ in 0..50 {
            if status_of(&mut health, "").await == ServingStatus::Serving as i32 {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(recovered, "health returns to SERVING once the disk is back ({fault:?})");
        let retried = support.submit_annotation(submit(&format!("during-{fault:?}"))).await.unwrap().into_inner();
        assert!(!retried.duplicate);
        acked.push(format!("during-{fault:?}"));
    }
    for i in 0..5 {
        support.submit_annotation(submit(&format!("after-{i}"))).await.unwrap();
        acked.push(format!("after-{i}"));
    }
    server.shutdown().await.unwrap();

    let counts = annotation_counts(&dir.path().join("log"));
    for id in &acked {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
    assert_eq!(counts.len(), acked.len(), "nothing unacknowledged is left in the log: {counts:?}");
}
