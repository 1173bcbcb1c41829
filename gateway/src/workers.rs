//! Sharded worker replicas: one set per worker kind, discovered by resolving the configured
//! `host:port` names again and again (a Kubernetes headless Service answers with every pod's
//! address, and each address is a replica), health-checked with `grpc.health.v1`, and called by
//! rendezvous hashing on the image key over the healthy replicas, moving on to the next replica
//! when one is down or overloaded.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use osprey_common::ServiceError;
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::routing::rank;

/// Turns a `host:port` name into socket addresses (DNS in production, a table in tests).
pub trait Resolver: Send + Sync {
    fn resolve(&self, host_port: String)
    -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;
}

/// The system resolver (`getaddrinfo`): every A/AAAA record of the name.
pub struct DnsResolver;

impl Resolver for DnsResolver {
    fn resolve(
        &self,
        host_port: String,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
        Box::pin(async move { Ok(tokio::net::lookup_host(host_port).await?.collect()) })
    }
}

/// One resolved address of a worker.
struct Replica {
    channel: Channel,
    healthy: bool,
}

/// The replicas of one worker kind.
pub struct Replicas {
    kind: &'static str,
    /// The configured names, as `host:port`.
    targets: Vec<String>,
    resolver: Arc<dyn Resolver>,
    /// TLS (and the gateway's client certificate) on every replica's channel; plaintext if `None`.
    tls: Option<ClientTlsConfig>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The addresses each target resolved to last time it resolved (kept when resolution fails,
    /// so a DNS hiccup does not empty the set).
    resolved: Vec<BTreeSet<String>>,
    /// Every known replica by URL (`http://ip:port`).
    replicas: BTreeMap<String, Replica>,
}

/// What one resolution round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Replicas {
    /// `targets` are `host:port` names (an `http://` prefix is accepted); they are checked here
    /// and resolved by [`Self::resolve`].
    pub fn new(kind: &'static str, targets: &[String]) -> Result<Self, String> {
        Self::with_resolver(kind, targets, Arc::new(DnsResolver))
    }

    pub fn with_resolver(
        kind: &'static str,
        targets: &[String],
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, String> {
        let targets = targets
            .iter()
            .map(|t| host_port(t).map_err(|e| format!("--{kind}-workers {t:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let state = State { resolved: vec![BTreeSet::new(); targets.len()], replicas: BTreeMap::new() };
        Ok(Self { kind, targets, resolver, tls: None, state: Mutex::new(state) })
    }

    /// Replicas reached over TLS with `tls` (`--worker-tls-*`).
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("replica state poisoned. This is a bug.")
    }

    /// Every known replica's URL and whether it is healthy, in URL order.
    pub fn replicas(&self) -> Vec<(String, bool)> {
        self.state().replicas.iter().map(|(url, r)| (url.clone(), r.healthy)).collect()
    }

    /// Resolves every target again; new addresses join (healthy until a check says otherwise),
    /// addresses no longer returned leave. A target that fails to resolve keeps its addresses.
    pub async fn resolve(&self) -> Change {
        let mut answers = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            answers.push(self.resolver.resolve(target.clone()).await);
        }
        let mut state = self.state();
        for ((target, answer), resolved) in self.targets.iter().zip(answers).zip(&mut state.resolved) {
            match answer {
                Ok(addresses) => {
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    *resolved = addresses.iter().map(|a| format!("{scheme}://{a}")).collect()
                }
                Err(err) => {
                    tracing::warn!(kind = self.kind, target, %err, "cannot resolve worker name; keeping its last addresses")
                }
            }
        }
        let wanted: BTreeSet<String> = state.resolved.iter().flatten().cloned().collect();
        let mut change = Change::default();
        state.replicas.retain(|url, _| {
            let keep = wanted.contains(url);
            if !keep {
                change.removed.push(url.clone());
            }
            keep
        });
        for url in wanted {
            if !state.replicas.contains_key(&url) {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .expect("a socket address makes a valid URL. This is a bug.")
                    .connect_timeout(Duration::from_secs(5));
                if let Some(tls) = &self.tls {
                    endpoint =
                        endpoint.tls_config(tls.clone()).expect("an https URL takes TLS. This is a bug.");
                }
                let channel = endpoint.connect_lazy();
                state.replicas.insert(url.clone(), Replica { channel, healthy: true });
                change.added.push(url);
            }
        }
        if !change.added.is_empty() || !change.removed.is_empty() {
            tracing::info!(kind = self.kind, added = ?change.added, removed = ?change.removed, "worker replicas changed");
        }
        self.export(&state);
        change
    }

    /// Asks every replica's `grpc.health.v1` whether it is SERVING (within `timeout`); marks
    /// each up or down accordingly.
    pub async fn check_health(&self, timeout: Duration) {
        let replicas: Vec<(String, Channel)> =
            self.state().replicas.iter().map(|(url, r)| (url.clone(), r.channel.clone())).collect();
        let mut checks = tokio::task::JoinSet::new();
        for (url, channel) in replicas {
            checks.spawn(async move {
                let mut client = HealthClient::new(channel);
                let check = client.check(HealthCheckRequest { service: String::new() });
                let serving = matches!(
                    tokio::time::timeout(timeout, check).await,
                    Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32
                );
                (url, serving)
            });
        }
        while let Some(result) = checks.join_next().await {
            if let Ok((url, serving)) = result {
                self.set_health(&url, serving);
            }
        }
    }

    fn set_health(&self, url: &str, healthy: bool) {
        let mut state = self.state();
        let Some(replica) = state.replicas.get_mut(url) else { return };
        if replica.healthy != healthy {
            replica.healthy = healthy;
            if healthy {
                tracing::info!(kind = self.kind, replica = url, "worker replica is back");
            } else {
                tracing::warn!(kind = self.kind, replica = url, "worker replica is down");
            }
            self.export(&state);
        }
    }

    fn export(&self, state: &State) {
        let up = state.replicas.values().filter(|r| r.healthy).count();
        let down = state.replicas.len() - up;
        metrics::gauge!("osprey_gateway_replicas", "kind" => self.kind, "state" => "up").set(up as f64);
        metrics::gauge!("osprey_gateway_replicas", "kind" => self.kind, "state" => "down").set(down as f64);
    }

    /// Keeps the replica set fresh in the background: resolves every `resolve_every`, checks
    /// health every `health_every` (and right after new replicas join). Stops when the replicas
    /// are dropped.
    pub fn maintain(self: &Arc<Self>, resolve_every: Duration, health_every: Duration) {
        let replicas: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut resolve = tokio::time::interval(resolve_every);
            let mut health = tokio::time::interval(health_every);
            resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let check = tokio::select! {
                    _ = resolve.tick() => {
                        let Some(replicas) = replicas.upgrade() else { return };
                        !replicas.resolve().await.added.is_empty()
                    }
                    _ = health.tick() => true,
                };
                if check {
                    let Some(replicas) = replicas.upgrade() else { return };
                    replicas.check_health(health_every).await;
                }
            }
        });
    }

    /// The replicas to try for `image_key`: the healthy ones in rendezvous order, then the ones
    /// marked down (a last resort, in case they are back before the next check says so).
    fn order(&self, image_key: &str) -> Vec<(String, Channel)> {
        let state = self.state();
        let (up, down): (Vec<String>, Vec<String>) =
            state.replicas.keys().cloned().partition(|url| state.replicas[url].healthy);
        rank(image_key, &up)
            .into_iter()
            .chain(rank(image_key, &down))
            .map(|url| (url.to_string(), state.replicas[url].channel.clone()))
            .collect()
    }

    /// Runs `call` on the replica preferred for `image_key`, moving on to the next replica when
    /// another one could succeed (see [`worth_another_replica`]); a replica that looks gone is
    /// marked down until its health check passes again. Other errors are final.
    pub async fn call<T, F, Fut>(&self, image_key: &str, mut call: F) -> Result<T, ServiceError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let order = self.order(image_key);
        if order.is_empty() {
            return Err(ServiceError::Unavailable(format!(
                "no {} workers are known (none configured, or their names resolve to nothing)",
                self.kind
            )));
        }
        let mut last = None;
        for (url, channel) in order {
            match call(channel).await {
                Ok(value) => return Ok(value),
                Err(status) if worth_another_replica(&status) => {
                    tracing::warn!(kind = self.kind, replica = url, %status, "replica failed; trying the next one");
                    metrics::counter!("osprey_gateway_replica_failures_total", "kind" => self.kind)
                        .increment(1);
                    if replica_gone(&status) {
                        self.set_health(&url, false);
                    }
                    last = Some(status);
                }
                Err(status) => return Err(status.into()),
            }
        }
        let status = last.expect("at least one replica was tried. This is a bug.");
        let message = format!("every {} worker failed; last: {}", self.kind, status.message());
        // A model failure or overload everywhere is told as such; anything else, as no worker.
        Err(match status.code() {
            Code::Internal => ServiceError::Internal(message),
            Code::ResourceExhausted => ServiceError::Overloaded(message),
            _ => ServiceError::Unavailable(message),
        })
    }
}

/// Failures another replica may not have: unreachable, overloaded, a model or resource failure
/// of this replica (INTERNAL), or the call's HTTP/2 stream failing without a gRPC status (UNKNOWN;
/// CANCELLED when the connection under the call went away: the gateway never cancels a call it
/// still awaits, and a call past its deadline is answered before it gets here).
fn worth_another_replica(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::ResourceExhausted | Code::Internal | Code::Unknown | Code::Cancelled
    )
}

/// Failures that say the replica itself is gone, not just this call: unreachable, or the
/// connection failing under the call (tonic reports a stream refused by a draining server's GOAWAY
/// as INTERNAL `h2 protocol error: ...`).
pub(crate) fn replica_gone(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => true,
        Code::Internal => status.message().starts_with("h2 protocol error"),
        _ => false,
    }
}

/// `host:port` from a worker flag entry: `host:port` or `http://host:port`.
fn host_port(entry: &str) -> Result<String, String> {
    let url = if entry.contains("://") { entry.to_string() } else { format!("http://{entry}") };
    let uri: Uri = url.parse().map_err(|e| format!("not host:port: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only plain http:// is supported between the gateway and its workers".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("a worker address has no path".into());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("a host is required")?;
    let port = uri.port_u16().ok_or("a port is required")?;
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Answers from a table the test edits; a missing name fails to resolve.
    #[derive(Default)]
    struct Table(Mutex<HashMap<String, Vec<SocketAddr>>>);

    impl Table {
        fn set(&self, name: &str, addresses: &[&str]) {
            let addresses = addresses.iter().map(|a| a.parse().unwrap()).collect();
            self.0.lock().unwrap().insert(name.to_string(), addresses);
        }
        fn forget(&self, name: &str) {
            self.0.lock().unwrap().remove(name);
        }
    }

    impl Resolver for Table {
        fn resolve(
            &self,
            host_port: String,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
            let answer = self.0.lock().unwrap().get(&host_port).cloned();
            Box::pin(async move { answer.ok_or_else(|| io::Error::other("no such name")) })
        }
    }

    fn urls(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn failures_another_replica_may_not_have_move_on() {
        use tonic::Status;
        for status in [
            Status::unavailable("connection refused"),
            Status::resource_exhausted("queue full"),
            Status::internal("h2 protocol error: http2 error"),
            Status::internal("model failed"),
            Status::cancelled("operation was canceled"),
        ] {
            assert!(worth_another_replica(&status), "{status:?}");
        }
        for status in [
            Status::invalid_argument("regions[0]"),
            Status::failed_precondition("no features"),
            Status::deadline_exceeded("too late"),
        ] {
            assert!(!worth_another_replica(&status), "{status:?}");
        }
        // Only a replica that looks gone is marked down; an overloaded or failing one stays up.
        assert!(replica_gone(&Status::unavailable("connection refused")));
        assert!(replica_gone(&Status::internal("h2 protocol error: http2 error")));
        assert!(!replica_gone(&Status::internal("model failed")));
        assert!(!replica_gone(&Status::resource_exhausted("queue full")));
    }

    #[test]
    fn flag_entries() {
        assert_eq!(host_port("vision:50052").unwrap(), "vision:50052");
        assert_eq!(host_port("http://10.0.0.1:50052").unwrap(), "10.0.0.1:50052");
        assert_eq!(host_port("http://[::1]:7").unwrap(), "[::1]:7");
        assert!(host_port("vision").unwrap_err().contains("port"));
        assert!(host_port("https://vision:1").unwrap_err().contains("http://"));
        assert!(host_port("http://vision:1/x").unwrap_err().contains("path"));
        assert!(host_port("").is_err());
    }

    #[tokio::test]
    async fn resolution_adds_and_removes_addresses() {
        let table = Arc::new(Table::default());
        table.set("vision.osprey.svc:50052", &["10.0.0.1:50052", "10.0.0.2:50052"]);
        table.set("10.9.9.9:50052", &["10.9.9.9:50052"]);
        let targets = urls(&["vision.osprey.svc:50052", "http://10.9.9.9:50052"]);
        let replicas = Replicas::with_resolver("vision", &targets, table.clone()).unwrap();
        assert!(replicas.replicas().is_empty());

        let change = replicas.resolve().await;
        assert_eq!(
            change.added,
            urls(&["http://10.0.0.1:50052", "http://10.0.0.2:50052", "http://10.9.9.9:50052"])
        );
        assert!(change.removed.is_empty());
        assert!(replicas.replicas().iter().all(|(_, healthy)| *healthy));

        // Same answer: nothing changes.
        assert_eq!(replicas.resolve().await, Change::default());

        // A pod is replaced by another (scale events, rescheduling).
        table.set("vision.osprey.svc:50052", &["10.0.0.2:50052", "10.0.0.3:50052"]);
        let change = replicas.resolve().await;
        assert_eq!(change.added, urls(&["http://10.0.0.3:50052"]));
        assert_eq!(change.removed, urls(&["http://10.0.0.1:50052"]));

        // A failed lookup keeps what the name resolved to before.
        table.forget("vision.osprey.svc:50052");
        assert_eq!(replicas.resolve().await, Change::default());
        assert_eq!(replicas.replicas().len(), 3);

        // A down replica keeps its state across resolutions and is tried last.
        replicas.set_health("http://10.0.0.2:50052", false);
        assert_eq!(replicas.resolve().await, Change::default());
        for key in ["a", "b", "c", "d", "e", "f"] {
            let order: Vec<String> = replicas.order(key).into_iter().map(|(url, _)| url).collect();
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], "http://10.0.0.2:50052");
        }

        // Two names resolving to the same address make one replica.
        table.set("vision.osprey.svc:50052", &["10.9.9.9:50052"]);
        let change = replicas.resolve().await;
        assert!(change.added.is_empty());
        assert_eq!(change.removed, urls(&["http://10.0.0.2:50052", "http://10.0.0.3:50052"]));
        assert_eq!(replicas.replicas(), vec![("http://10.9.9.9:50052".to_string(), true)]);
    }

    #[test]
    fn bad_flags_name_the_kind() {
        let err = Replicas::new("llm", &urls(&["llm"])).err().unwrap();
        assert!(err.contains("--llm-workers"), "{err}");
    }
}
