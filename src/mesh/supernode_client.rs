//! dfdaemon's side of the supernode API: registration and heartbeats with
//! every configured supernode, and calls routed to the supernode that owns
//! a blob's task.
//!
//! Tasks are spread over supernodes by rendezvous hashing of the digest
//! (each supernode scores `sha256(digest, address)`; the highest owns the
//! task, the next takes over if it is down). With a handful of supernodes
//! this is as even as a hash ring and needs no ring. Every call has a short
//! deadline: a dead supernode costs a pull a few seconds at most.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};

use crate::protocol::status::Refusal;

use crate::protocol::api::supernode_client::SupernodeClient as ApiClient;
use crate::protocol::api::{HeartbeatRequest, HeldBlob, Host, RegisterRequest};
use crate::store::Digest;

/// How long to wait for a TCP connection to a supernode.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Deadline of each call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Heartbeat interval until a supernode tells its own.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// Errors talking to the supernodes.
#[derive(Debug, thiserror::Error)]
pub enum SupernodeError {
    #[error("no supernode could be reached (last error: {0})")]
    Unreachable(String),
    #[error("supernode {addr} does not know the blob (it restarted)")]
    UnknownTask { addr: String },
    #[error("supernode {addr} refused {what}: {status}")]
    Refused {
        addr: String,
        what: &'static str,
        status: Status,
    },
}

/// One configured supernode.
struct Node {
    addr: String,
    client: ApiClient<Channel>,
    registered: AtomicBool,
    /// Its last heartbeat, or a call, found it unreachable: calls skip it
    /// (at once, instead of waiting for a timeout) until a heartbeat gets
    /// through again.
    down: AtomicBool,
}

/// The supernodes this daemon uses.
pub struct Supernodes {
    host: Host,
    nodes: Vec<Node>,
    heartbeat_ms: AtomicU32,
    /// Bumped when this node stops holding something it registered: each
    /// supernode's heartbeat loop registers again when it sees a new value.
    holdings_version: AtomicU64,
}

/// What a supernode answered, with which supernode answered it.
pub struct Answer<T> {
    pub addr: String,
    pub value: T,
}

impl Supernodes {
    /// Supernodes at `addrs` ("ip:port"); connections are made on first use.
    pub fn new(host: Host, addrs: &[String]) -> anyhow::Result<Arc<Self>> {
        // Calls come from the advertised IP: the supernode refuses a call
        // for this host from any other address.
        let source: std::net::IpAddr = host
            .ip
            .parse()
            .map_err(|e| anyhow::anyhow!("advertised ip {:?}: {e}", host.ip))?;
        let mut nodes = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| anyhow::anyhow!("supernode address {addr:?}: {e}"))?
                .local_address(Some(source))
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT);
            nodes.push(Node {
                addr: addr.clone(),
                client: ApiClient::new(endpoint.connect_lazy()),
                registered: AtomicBool::new(false),
                down: AtomicBool::new(false),
            });
        }
        Ok(Arc::new(Self {
            host,
            nodes,
            heartbeat_ms: AtomicU32::new(DEFAULT_HEARTBEAT.as_millis() as u32),
            holdings_version: AtomicU64::new(0),
        }))
    }

    /// Asks for a registration with every supernode at its next heartbeat
    /// (Register replaces what a supernode thinks this host holds).
    pub fn holdings_changed(&self) {
        self.holdings_version.fetch_add(1, Ordering::Relaxed);
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The supernodes in the order a task for `digest` should try them.
    fn order(&self, digest: &Digest) -> Vec<&Node> {
        let mut scored: Vec<(Vec<u8>, &Node)> = self
            .nodes
            .iter()
            .map(|node| {
                let score = Sha256::new()
                    .chain_update(digest.as_str())
                    .chain_update([0])
                    .chain_update(&node.addr)
                    .finalize()
                    .to_vec();
                (score, node)
            })
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0));
        scored.into_iter().map(|(_, node)| node).collect()
    }

    /// Calls the first supernode for `digest` that answers. A supernode that
    /// does not know this host (it restarted) gets a registration first.
    pub async fn call<T, F, Fut>(
        &self,
        digest: &Digest,
        what: &'static str,
        held: &(dyn Fn() -> Vec<HeldBlob> + Sync),
        call: F,
    ) -> Result<Answer<T>, SupernodeError>
    where
        F: Fn(ApiClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut last = String::from("no supernode configured");
        for node in self.order(digest) {
            if node.down.load(Ordering::Relaxed) {
                last = format!("{}: unreachable at the last heartbeat", node.addr);
                continue;
            }
            if !node.registered.load(Ordering::Relaxed)
                && let Err(e) = self.register(node, held()).await
            {
                if unreachable(&e) {
                    node.down.store(true, Ordering::Relaxed);
                }
                last = format!("{}: {e}", node.addr);
                continue;
            }
            match call(node.client.clone()).await {
                Ok(response) => {
                    return Ok(Answer {
                        addr: node.addr.clone(),
                        value: response.into_inner(),
                    });
                }
                Err(status) if Refusal::of(&status) == Refusal::RegisterAgain => {
                    // It forgot us: register and try once more.
                    node.registered.store(false, Ordering::Relaxed);
                    if self.register(node, held()).await.is_ok()
                        && let Ok(response) = call(node.client.clone()).await
                    {
                        return Ok(Answer {
                            addr: node.addr.clone(),
                            value: response.into_inner(),
                        });
                    }
                    last = format!("{}: {status}", node.addr);
                }
                Err(status) if Refusal::of(&status) == Refusal::TaskLost => {
                    // The owner lost the task; the next supernode never had it.
                    return Err(SupernodeError::UnknownTask {
                        addr: node.addr.clone(),
                    });
                }
                Err(status) if Refusal::of(&status) == Refusal::Invalid => {
                    return Err(SupernodeError::Refused {
                        addr: node.addr.clone(),
                        what,
                        status,
                    });
                }
                Err(status) => {
                    tracing::warn!(supernode = %node.addr, what, error = %status, "supernode call failed, trying the next");
                    if unreachable(&status) {
                        node.down.store(true, Ordering::Relaxed);
                    }
                    last = format!("{}: {status}", node.addr);
                }
            }
        }
        Err(SupernodeError::Unreachable(last))
    }

    async fn register(&self, node: &Node, blobs: Vec<HeldBlob>) -> Result<(), Status> {
        let response = node
            .client
            .clone()
            .register(RegisterRequest {
                host: Some(self.host.clone()),
                blobs,
            })
            .await?
            .into_inner();
        if response.heartbeat_ms > 0 {
            self.heartbeat_ms
                .store(response.heartbeat_ms, Ordering::Relaxed);
        }
        if !node.registered.swap(true, Ordering::Relaxed) {
            tracing::info!(supernode = %node.addr, host = %self.host.id, "registered with supernode");
        }
        Ok(())
    }

    /// Sends heartbeats to every supernode forever, each on its own clock
    /// (a supernode that times out does not delay the others' heartbeats).
    /// `held` tells what to register, `uploads` the uploads in progress.
    pub async fn heartbeats(
        self: Arc<Self>,
        held: Arc<dyn Fn() -> Vec<HeldBlob> + Send + Sync>,
        uploads: Arc<dyn Fn() -> u32 + Send + Sync>,
    ) {
        let loops = self
            .nodes
            .iter()
            .map(|node| self.keep_alive(node, held.as_ref(), uploads.as_ref()));
        futures::future::join_all(loops).await;
    }

    /// One supernode's heartbeats: marks it down or back, and registers
    /// again when it lost this host or this host's holdings changed.
    async fn keep_alive(
        &self,
        node: &Node,
        held: &(dyn Fn() -> Vec<HeldBlob> + Send + Sync),
        uploads: &(dyn Fn() -> u32 + Send + Sync),
    ) {
        let mut registered_version = None;
        loop {
            let version = self.holdings_version.load(Ordering::Relaxed);
            let beat = node
                .client
                .clone()
                .heartbeat(HeartbeatRequest {
                    host_id: self.host.id.clone(),
                    uploads_in_use: uploads(),
                })
                .await;
            match beat {
                Ok(response) => {
                    if node.down.swap(false, Ordering::Relaxed) {
                        tracing::info!(supernode = %node.addr, "supernode reachable again");
                    }
                    if response.into_inner().reregister {
                        node.registered.store(false, Ordering::Relaxed);
                    }
                    let stale = registered_version != Some(version);
                    if (!node.registered.load(Ordering::Relaxed) || stale)
                        && self.register(node, held()).await.is_ok()
                    {
                        registered_version = Some(version);
                    }
                }
                Err(status) => {
                    node.registered.store(false, Ordering::Relaxed);
                    if !node.down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(supernode = %node.addr, error = %status, "lost supernode");
                    }
                }
            }
            let interval = self.heartbeat_ms.load(Ordering::Relaxed).max(100);
            tokio::time::sleep(Duration::from_millis(u64::from(interval))).await;
        }
    }
}

/// Whether a failed call says the supernode could not be reached at all
/// (as opposed to an answer that refuses the request).
fn unreachable(status: &Status) -> bool {
    Refusal::of(status) == Refusal::Unreachable
}
