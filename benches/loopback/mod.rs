//! Shared by the gRPC benches: clients on their own loopback connections,
//! calls spread over them for criterion's `iter_custom`, and percentiles.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aitl::proto::support_service_client::SupportServiceClient;
use tonic::transport::Channel;

pub type Client = SupportServiceClient<Channel>;

/// One client per connection, as separate CRM backends would be.
pub async fn connect(addr: SocketAddr, clients: usize) -> Vec<Client> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let endpoint = Channel::from_shared(format!("http://{addr}")).expect("address");
        connected.push(SupportServiceClient::new(endpoint.tcp_nodelay(true).connect().await.expect("connects")));
    }
    connected
}

/// Makes `iters` calls spread evenly over `clients` (concurrently), records
/// each call's latency, and returns the wall time per call.
pub fn run_calls<F, Fut>(
    runtime: &tokio::runtime::Runtime,
    clients: &[Client],
    iters: u64,
    latencies: &Arc<Mutex<Vec<Duration>>>,
    call: F,
) -> Duration
where
    F: Fn(Client, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let per_client = iters.div_ceil(clients.len() as u64);
    runtime.block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(c, client)| {
                let (client, latencies, call) = (client.clone(), latencies.clone(), call.clone());
                tokio::spawn(async move {
                    let mut mine = Vec::with_capacity(per_client as usize);
                    for i in 0..per_client {
                        let t = Instant::now();
                        call(client.clone(), c, i).await;
                        mine.push(t.elapsed());
                    }
                    latencies.lock().unwrap().extend(mine);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        started.elapsed().mul_f64(iters as f64 / (per_client * clients.len() as u64) as f64)
    })
}

/// Prints p50 and p99 of what `run_calls` recorded.
pub fn print_percentiles(name: &str, latencies: &Mutex<Vec<Duration>>) {
    let mut all = latencies.lock().unwrap().clone();
    if all.is_empty() {
        return;
    }
    all.sort();
    let at = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!("{name}: {} calls, p50 {:.2?}, p99 {:.2?}", all.len(), at(0.5), at(0.99));
}
