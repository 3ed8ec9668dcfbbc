//! Passthrough: a mesh's `egressFilter: ALLOW_ALL` at a sidecar's egress. A request for a host no
//! virtual host serves goes to the host it names — HTTP to `host:port` (80 without a port),
//! CONNECT tunnels to theirs — with no retries or timeouts, as Envoy's passthrough cluster did.
//! Each destination gets a route with a one-endpoint cluster of its own, made at its first
//! request and kept (with its pooled connections) while the snapshot runs.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::AtomicUsize},
};

use http::uri::Authority;
use parking_lot::Mutex;

use crate::{
    balance::WeightedTargets,
    error::ProxyError,
    metrics::ProxyMetrics,
    route::{Route, RouteMatch, Timeouts},
    steps::Steps,
    upstream::{self, Cluster, EndpointState, Health, LbPolicy, Protocol},
};

/// The name of passthrough routes and clusters in metrics and logs.
pub const NAME: &str = "passthrough";

/// Destinations kept; beyond that the oldest half is forgotten (their pooled connections close).
const MAX_DESTINATIONS: usize = 1024;

#[derive(Debug)]
pub struct Passthrough {
    metrics: ProxyMetrics,
    destinations: Mutex<Destinations>,
}

/// Routes by `host:port`, and the order they were made in.
#[derive(Debug, Default)]
struct Destinations {
    routes: HashMap<Arc<str>, Arc<Route>>,
    order: VecDeque<Arc<str>>,
}

impl Passthrough {
    pub fn new(metrics: ProxyMetrics) -> Self {
        Self {
            metrics,
            destinations: Mutex::default(),
        }
    }

    /// The route to the host `authority` names (`host[:port]`; 80 when it names no port).
    pub fn route(&self, authority: &str) -> Result<Arc<Route>, ProxyError> {
        let parsed: Authority = authority
            .parse()
            .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
        if parsed.host().is_empty() || parsed.as_str().contains('@') {
            return Err(ProxyError::BadRequest("invalid authority"));
        }
        let addr: Arc<str> =
            format!("{}:{}", parsed.host(), parsed.port_u16().unwrap_or(80)).into();
        let mut d = self.destinations.lock();
        if let Some(route) = d.routes.get(&addr) {
            return Ok(route.clone());
        }
        if d.routes.len() >= MAX_DESTINATIONS {
            for _ in 0..MAX_DESTINATIONS / 2 {
                if let Some(old) = d.order.pop_front() {
                    d.routes.remove(&old);
                }
            }
        }
        let route = Arc::new(self.make(&addr));
        d.routes.insert(addr.clone(), route.clone());
        d.order.push_back(addr);
        Ok(route)
    }

    fn make(&self, addr: &str) -> Route {
        let endpoint = Arc::new(EndpointState::new(addr, Protocol::Http1));
        let cluster = Arc::new(Cluster {
            name: NAME.into(),
            protocol: Protocol::Http1,
            lb: LbPolicy::RoundRobin,
            connect_timeout: upstream::DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: upstream::DEFAULT_POOL_IDLE_TIMEOUT,
            endpoints: vec![(endpoint.clone(), Health::Healthy)],
            healthy: vec![endpoint],
            cursor: AtomicUsize::new(0),
            metrics: self.metrics.cluster(NAME),
            outlier: None,
            limits: None,
            health_check: None,
            authority_port: None,
            slow_start: None,
            ramping_until: None,
            hashing: None,
            local_zone: None,
        });
        Route {
            name: NAME.into(),
            priority: 0,
            matcher: RouteMatch::default(),
            targets: WeightedTargets::new([(cluster, 1, self.metrics.requests(NAME, NAME))]),
            retry: None,
            timeouts: Timeouts::default(),
            steps: Steps::default(),
            direct: None,
            fault: None,
            rate_limit: None,
            mirror: None,
        }
    }
}
