//! A Trellis snapshot as Envoy's xDS resources (LDS, RDS, CDS, EDS), for stock Envoy sidecars
//! driven over ADS (`xds`). The snapshot is the one trellis-proxy would run, already checked by
//! its compiler; this maps it field by field to Envoy's API with the same semantics, and refuses
//! (with the field's path and why) what has no translation yet: such a snapshot is withheld from
//! the Envoy, never sent with a piece left out.

use std::collections::BTreeMap;

use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cluster, core::v3 as core, endpoint::v3 as endpoint,
            listener::v3 as listener, rbac::v3 as rbac, route::v3 as route,
        },
        extensions::{
            filters::{
                http::router::v3::Router,
                network::{http_connection_manager::v3 as hcm, tcp_proxy::v3 as tcp_proxy},
            },
            transport_sockets::tls::v3 as tls,
            upstreams::http::v3 as upstream_http,
        },
        r#type::{matcher::v3 as matcher, v3 as types},
    },
    google::protobuf::{Any, Duration, UInt32Value},
};
use prost::{Message, Name};
use trellis_proto::v1 as pb;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The gRPC metadata an Envoy's ADS stream carries its node's join token in.
pub const JOIN_TOKEN_HEADER: &str = "x-trellis-join-token";
/// SDS: the two secrets below, served on the same ADS stream.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The Envoy's workload certificate and key (issued by the mesh's CA for its node).
pub const IDENTITY_SECRET: &str = "trellis-identity";
/// The mesh's trust bundle (every root proxies trust).
pub const BUNDLE_SECRET: &str = "trellis-trust-bundle";

/// What the translation of one Envoy's snapshot depends on besides the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Holder {
    /// Where it listens.
    pub addresses: Addresses,
    /// It holds a workload certificate (a join token admitted its stream): mTLS is served to
    /// it as the `trellis-identity` secret.
    pub identity: bool,
    /// Revoked identities whose certificates issued before their revocation may still be
    /// valid: Envoy cannot tell those from certificates issued since (it cannot compare a
    /// certificate's notBefore), so it refuses the identity whatever certificate proves it,
    /// until the last revoked one has expired (`xds` works out when).
    pub denied: Vec<String>,
}

/// Where an Envoy sidecar listens (its bootstrap's node metadata `TRELLIS_INGRESS` and
/// `TRELLIS_EGRESS`; App Mesh's ports by default).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Addresses {
    pub ingress: std::net::SocketAddr,
    pub egress: std::net::SocketAddr,
}

impl Default for Addresses {
    fn default() -> Self {
        Self {
            ingress: ([0, 0, 0, 0], 15000).into(),
            egress: ([127, 0, 0, 1], 15001).into(),
        }
    }
}

/// One snapshot's resources, by type, each by name.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub listeners: BTreeMap<String, Any>,
    pub routes: BTreeMap<String, Any>,
    pub clusters: BTreeMap<String, Any>,
    pub endpoints: BTreeMap<String, Any>,
}

impl Resources {
    /// The resources of `type_url`.
    pub fn of(&self, type_url: &str) -> Option<&BTreeMap<String, Any>> {
        match type_url {
            LISTENER => Some(&self.listeners),
            ROUTE => Some(&self.routes),
            CLUSTER => Some(&self.clusters),
            ENDPOINT => Some(&self.endpoints),
            _ => None,
        }
    }
}

/// What cannot be translated: (field path in the snapshot, why).
pub type Refused = Vec<(String, String)>;

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn duration(d: Option<&trellis_proto::Duration>) -> Option<Duration> {
    d.map(|d| Duration {
        seconds: d.seconds,
        nanos: d.nanos,
    })
}

fn socket(addr: &str) -> Option<core::Address> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u32 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: host.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

struct Translator {
    refused: Refused,
}

impl Translator {
    fn refuse(&mut self, path: impl Into<String>, what: &str) {
        self.refused.push((
            path.into(),
            format!("not supported for Envoy sidecars yet: {what}"),
        ));
    }
}

/// The Envoy resources of `snapshot` for a sidecar or gateway as `holder` says.
pub fn translate(snapshot: &pb::Snapshot, holder: &Holder) -> Result<Resources, Refused> {
    let addresses = &holder.addresses;
    let mut t = Translator {
        refused: Vec::new(),
    };
    let mut out = Resources::default();
    // One line per request (per connection on TCP listeners) on every listener.
    let access_log: Vec<_> = snapshot.access_log.iter().map(access_log).collect();
    if snapshot.tracing.is_some() {
        t.refuse("tracing", "tracing");
    }
    for (i, l) in snapshot.listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        let address = match pb::listener::Role::try_from(l.role) {
            Ok(pb::listener::Role::Ingress) => Some(addresses.ingress),
            Ok(pb::listener::Role::Egress) => Some(addresses.egress),
            _ if !l.address.is_empty() => l.address.parse().ok(),
            _ if l.port != 0 => u16::try_from(l.port)
                .ok()
                .map(|p| (addresses.ingress.ip(), p).into()),
            _ => None,
        };
        let Some(address) = address.and_then(|a| socket(&a.to_string())) else {
            t.refuse(format!("{path}.address"), "a listener without an address");
            continue;
        };
        let http = l.protocol != pb::listener::Protocol::Tcp as i32;
        // A TCP listener's callers are checked in the handshake (the certificate must name one
        // of them, not revoked): Envoy's network RBAC would only look at the client's first
        // bytes, after the app's connection is open (and a server-first protocol has spoken).
        // Only where the handshake decides alone: STRICT, requiring a certificate the mesh's
        // way (no names of its own), with one to serve; elsewhere RBAC on the first bytes.
        let handshake_decides = l.tls.as_ref().is_some_and(|tls| {
            tls.mode == pb::server_tls::Mode::Strict as i32
                && tls
                    .client_validation
                    .as_ref()
                    .is_some_and(|v| v.subject_alt_names.is_empty())
                && (tls.certificate.is_some() || holder.identity)
        });
        let handshake_callers = match &l.authorization {
            Some(a) if !http && handshake_decides => {
                let mut ids: Vec<String> = a
                    .identities
                    .iter()
                    .filter(|id| !holder.denied.contains(id))
                    .cloned()
                    .collect();
                if ids.is_empty() {
                    ids.push(NO_ONE.into());
                }
                Some(ids)
            }
            _ => None,
        };
        let server = l.tls.as_ref().map(|tls| {
            server_tls(
                &mut t,
                &format!("{path}.tls"),
                tls,
                holder,
                http,
                handshake_callers.as_deref(),
            )
        });
        // Who may not call (revoked identities) and who alone may (the mesh graph's callers),
        // by the verified certificate's URI SAN: RBAC, ahead of the proxying filter.
        let validates = l
            .tls
            .as_ref()
            .is_some_and(|t| t.client_validation.is_some());
        let mut rules = Vec::new();
        if validates && !holder.denied.is_empty() && handshake_callers.is_none() {
            rules.push((
                "revoked",
                rbac_rules(rbac::rbac::Action::Deny, &holder.denied),
            ));
        }
        if let Some(a) = &l.authorization
            && handshake_callers.is_none()
        {
            rules.push((
                "callers",
                rbac_rules(rbac::rbac::Action::Allow, &a.identities),
            ));
        }
        let filter = if !http {
            let Some(tcp) = &l.tcp else {
                t.refuse(format!("{path}.tcp"), "a TCP listener without targets");
                continue;
            };
            let clusters = tcp
                .weighted_targets
                .iter()
                .filter(|w| w.weight > 0)
                .map(|w| tcp_proxy::tcp_proxy::weighted_cluster::ClusterWeight {
                    name: w.cluster.clone(),
                    weight: w.weight,
                    ..Default::default()
                })
                .collect();
            let proxy = tcp_proxy::TcpProxy {
                // Over TLS the app's connection opens once the handshake (and its check of
                // the caller) is done.
                upstream_connect_mode: if l.tls.is_some() {
                    tcp_proxy::UpstreamConnectMode::OnDownstreamTlsHandshake as i32
                } else {
                    tcp_proxy::UpstreamConnectMode::Immediate as i32
                },
                max_early_data_bytes: l.tls.is_some().then_some(UInt32Value { value: 0 }),
                stat_prefix: l.name.clone(),
                idle_timeout: duration(tcp.idle.as_ref()).or(Some(Duration::default())),
                access_log: access_log.clone(),
                cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::WeightedClusters(
                    tcp_proxy::tcp_proxy::WeightedCluster { clusters },
                )),
                ..Default::default()
            };
            let mut filters: Vec<listener::Filter> = rules
                .iter()
                .map(|(prefix, rules)| listener::Filter {
                    name: "envoy.filters.network.rbac".into(),
                    config_type: Some(listener::filter::ConfigType::TypedConfig(any(
                        &envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac {
                            rules: Some(rules.clone()),
                            stat_prefix: format!("{}.{prefix}", l.name),
                            ..Default::default()
                        },
                    ))),
                })
                .collect();
            filters.push(listener::Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&proxy))),
            });
            filters
        } else {
            let passthrough = match pb::listener::Unmatched::try_from(l.unmatched) {
                Ok(pb::listener::Unmatched::NotFound | pb::listener::Unmatched::Deny) => false,
                Ok(pb::listener::Unmatched::Passthrough) => true,
                Err(_) => {
                    t.refuse(format!("{path}.unmatched"), "an unknown unmatched action");
                    false
                }
            };
            if passthrough {
                out.clusters
                    .insert(PASSTHROUGH.into(), any(&passthrough_cluster()));
            }
            let routes = route_config(&mut t, &path, l, snapshot);
            out.routes.insert(l.name.clone(), any(&routes));
            // A gateway's listeners face clients outside the mesh: Envoy then strips their
            // x-envoy-* headers (retries, timeouts a client could otherwise set).
            let role = pb::listener::Role::try_from(l.role);
            let edge = role.is_ok_and(|r| r == pb::listener::Role::Unspecified);
            let mut http_filters: Vec<hcm::HttpFilter> = rules
                .iter()
                .map(|(prefix, rules)| hcm::HttpFilter {
                    name: "envoy.filters.http.rbac".into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                        &envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac {
                            rules: Some(rules.clone()),
                            rules_stat_prefix: format!("{prefix}."),
                            ..Default::default()
                        },
                    ))),
                    ..Default::default()
                })
                .collect();
            // Faults are routes' own (their per-route config); the filter runs them.
            if l.virtual_hosts
                .iter()
                .any(|h| h.routes.iter().any(|r| r.fault.is_some()))
            {
                http_filters.push(hcm::HttpFilter {
                    name: FAULT.into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                        &envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault::default(),
                    ))),
                    ..Default::default()
                });
            }
            if passthrough {
                // Resolves the host a passthrough request names, for the passthrough cluster.
                http_filters.push(hcm::HttpFilter {
                    name: "envoy.filters.http.dynamic_forward_proxy".into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                        &envoy_types::pb::envoy::extensions::filters::http::dynamic_forward_proxy::v3::FilterConfig {
                            implementation_specifier: Some(
                                envoy_types::pb::envoy::extensions::filters::http::dynamic_forward_proxy::v3::filter_config::ImplementationSpecifier::DnsCacheConfig(dns_cache()),
                            ),
                            ..Default::default()
                        },
                    ))),
                    ..Default::default()
                });
            }
            http_filters.push(hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &Router::default(),
                ))),
                ..Default::default()
            });
            // At a sidecar's ingress the app learns its caller: x-forwarded-client-cert set
            // from a certificate verified against the mesh's bundle (a client's own removed
            // first, always).
            let mesh_verified = l.tls.as_ref().is_some_and(|t| {
                t.client_validation
                    .as_ref()
                    .is_some_and(|v| v.trust_files.is_empty())
            });
            let ingress = role.is_ok_and(|r| r == pb::listener::Role::Ingress);
            let (forward, current) = if ingress && mesh_verified {
                (
                    hcm::http_connection_manager::ForwardClientCertDetails::SanitizeSet,
                    Some(hcm::http_connection_manager::SetCurrentClientCertDetails {
                        uri: true,
                        ..Default::default()
                    }),
                )
            } else {
                (
                    hcm::http_connection_manager::ForwardClientCertDetails::Sanitize,
                    None,
                )
            };
            let manager = hcm::HttpConnectionManager {
                forward_client_cert_details: forward as i32,
                set_current_client_cert_details: current,
                stat_prefix: l.name.clone(),
                use_remote_address: Some(envoy_types::pb::google::protobuf::BoolValue {
                    value: edge,
                }),
                // No stream idle limit unless a route sets one (Envoy's default is 300 s).
                stream_idle_timeout: Some(Duration::default()),
                upgrade_configs: std::iter::once("websocket")
                    .chain(passthrough.then_some("CONNECT"))
                    .map(|u| hcm::http_connection_manager::UpgradeConfig {
                        upgrade_type: u.into(),
                        ..Default::default()
                    })
                    .collect(),
                http2_protocol_options: passthrough.then(|| core::Http2ProtocolOptions {
                    allow_connect: true,
                    ..Default::default()
                }),
                codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
                route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                    hcm::Rds {
                        config_source: Some(ads()),
                        route_config_name: l.name.clone(),
                    },
                )),
                http_filters,
                access_log: access_log.clone(),
                ..Default::default()
            };
            vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&manager))),
            }]
        };
        let plain = listener::FilterChain {
            filters: filter.clone(),
            ..Default::default()
        };
        let mut envoy_listener = listener::Listener {
            name: l.name.clone(),
            address: Some(address),
            filter_chains: vec![],
            ..Default::default()
        };
        match server.flatten() {
            // PERMISSIVE: TLS when the client's first bytes start a handshake, else plaintext
            // (a client silent for 500 ms too: a protocol whose server speaks first).
            Some((socket, true)) => {
                envoy_listener.listener_filters = vec![listener::ListenerFilter {
                    name: "envoy.filters.listener.tls_inspector".into(),
                    config_type: Some(listener::listener_filter::ConfigType::TypedConfig(any(
                        &envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector::default(),
                    ))),
                    ..Default::default()
                }];
                envoy_listener.listener_filters_timeout = Some(Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                });
                envoy_listener.continue_on_listener_filters_timeout = true;
                let by = |protocol: &str| {
                    Some(listener::FilterChainMatch {
                        transport_protocol: protocol.into(),
                        ..Default::default()
                    })
                };
                envoy_listener.filter_chains = vec![
                    listener::FilterChain {
                        filter_chain_match: by("tls"),
                        filters: filter,
                        transport_socket: Some(socket),
                        ..Default::default()
                    },
                    listener::FilterChain {
                        filter_chain_match: by("raw_buffer"),
                        ..plain
                    },
                ];
            }
            Some((socket, false)) => {
                envoy_listener.filter_chains = vec![listener::FilterChain {
                    transport_socket: Some(socket),
                    ..plain
                }];
            }
            None => envoy_listener.filter_chains = vec![plain],
        }
        out.listeners.insert(l.name.clone(), any(&envoy_listener));
    }
    for (i, c) in snapshot.clusters.iter().enumerate() {
        let path = format!("clusters[{i}]");
        let (resource, assignment) = cluster(&mut t, &path, c, holder);
        out.clusters.insert(c.name.clone(), any(&resource));
        if let Some(assignment) = assignment {
            out.endpoints.insert(c.name.clone(), any(&assignment));
        }
    }
    if t.refused.is_empty() {
        Ok(out)
    } else {
        Err(t.refused)
    }
}

fn route_config(
    t: &mut Translator,
    path: &str,
    l: &pb::Listener,
    snapshot: &pb::Snapshot,
) -> route::RouteConfiguration {
    let mut virtual_hosts: Vec<route::VirtualHost> = l
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(h, vh)| {
            let mut routes: Vec<(i32, route::Route)> = vh
                .routes
                .iter()
                .enumerate()
                .map(|(r, rt)| {
                    let p = format!("{path}.virtualHosts[{h}].routes[{r}]");
                    (rt.priority, http_route(t, &p, rt, snapshot))
                })
                .collect();
            // trellis-proxy matches `host` whatever the port: Envoy compares the whole
            // authority, so `host:*` too. A `*.suffix` would be compared with the port.
            let mut domains = Vec::new();
            for (d, domain) in vh.domains.iter().enumerate() {
                domains.push(domain.clone());
                if domain.starts_with("*.") {
                    t.refuse(
                        format!("{path}.virtualHosts[{h}].domains[{d}]"),
                        "a wildcard hostname (Envoy would compare it with the request's port)",
                    );
                } else if domain != "*" && !domain.contains(':') {
                    let any_port = format!("{domain}:*");
                    if !vh.domains.contains(&any_port) {
                        domains.push(any_port);
                    }
                }
            }
            // Lower priority first, in order (Envoy takes the first match).
            routes.sort_by_key(|(priority, _)| *priority);
            route::VirtualHost {
                name: vh.name.clone(),
                domains,
                routes: routes.into_iter().map(|(_, r)| r).collect(),
                ..Default::default()
            }
        })
        .collect();
    let catch_all = l
        .virtual_hosts
        .iter()
        .any(|h| h.domains.iter().any(|d| d == "*"));
    if l.unmatched == pb::listener::Unmatched::Passthrough as i32 && !catch_all {
        // To the host the request names (CONNECT tunnels to theirs), with no retries or
        // timeouts: trellis-proxy's passthrough, Envoy's dynamic forward proxy.
        let to_passthrough = |r#match: route::RouteMatch, upgrade: Option<&str>| route::Route {
            name: PASSTHROUGH.into(),
            r#match: Some(r#match),
            action: Some(route::route::Action::Route(route::RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                    PASSTHROUGH.into(),
                )),
                timeout: Some(Duration::default()),
                upgrade_configs: upgrade
                    .map(|u| route::route_action::UpgradeConfig {
                        upgrade_type: u.into(),
                        connect_config: Some(
                            route::route_action::upgrade_config::ConnectConfig::default(),
                        ),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        };
        virtual_hosts.push(route::VirtualHost {
            name: PASSTHROUGH.into(),
            domains: vec!["*".into()],
            routes: vec![
                to_passthrough(
                    route::RouteMatch {
                        path_specifier: Some(route::route_match::PathSpecifier::ConnectMatcher(
                            route::route_match::ConnectMatcher {},
                        )),
                        ..Default::default()
                    },
                    Some("CONNECT"),
                ),
                to_passthrough(
                    route::RouteMatch {
                        path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    },
                    None,
                ),
            ],
            ..Default::default()
        });
    }
    if l.unmatched == pb::listener::Unmatched::Deny as i32 && !catch_all {
        virtual_hosts.push(route::VirtualHost {
            name: "egress-denied".into(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::DirectResponse(
                    route::DirectResponseAction {
                        status: 403,
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    // At a sidecar's ingress the connection manager replaces x-forwarded-client-cert; its `_`
    // spelling goes too (servers reading `_` and `-` alike would take it for the header), as
    // at trellis-proxy's.
    let ingress = l.role == pb::listener::Role::Ingress as i32;
    route::RouteConfiguration {
        name: l.name.clone(),
        virtual_hosts,
        request_headers_to_remove: if ingress {
            vec!["x_forwarded_client_cert".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

fn string_matcher(p: matcher::string_matcher::MatchPattern) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(p),
        ..Default::default()
    }
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

fn header_exact(name: &str, value: &str) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(matcher::string_matcher::MatchPattern::Exact(value.into())),
        )),
        ..Default::default()
    }
}

/// A header match (App Mesh's, with every rule and inversion) as Envoy's.
fn header_matcher(t: &mut Translator, path: &str, h: &pb::HeaderMatch) -> route::HeaderMatcher {
    use route::header_matcher::HeaderMatchSpecifier as S;
    let spec = match &h.rule {
        Some(pb::header_match::Rule::Exact(v)) => S::StringMatch(string_matcher(
            matcher::string_matcher::MatchPattern::Exact(v.clone()),
        )),
        Some(pb::header_match::Rule::Prefix(v)) => S::StringMatch(string_matcher(
            matcher::string_matcher::MatchPattern::Prefix(v.clone()),
        )),
        Some(pb::header_match::Rule::Suffix(v)) => S::StringMatch(string_matcher(
            matcher::string_matcher::MatchPattern::Suffix(v.clone()),
        )),
        Some(pb::header_match::Rule::Regex(v)) => S::StringMatch(string_matcher(
            matcher::string_matcher::MatchPattern::SafeRegex(regex(v)),
        )),
        Some(pb::header_match::Rule::Range(r)) => S::RangeMatch(types::Int64Range {
            start: r.start,
            end: r.end,
        }),
        Some(pb::header_match::Rule::Present(p)) => S::PresentMatch(*p),
        None => S::PresentMatch(true),
    };
    if h.name.is_empty() {
        t.refuse(format!("{path}.name"), "an empty header name");
    }
    route::HeaderMatcher {
        name: h.name.clone(),
        invert_match: h.invert,
        // An inverted rule matches a request without the header, as trellis-proxy's.
        treat_missing_header_as_empty: h.invert
            && !matches!(h.rule, Some(pb::header_match::Rule::Present(_)) | None),
        header_match_specifier: Some(spec),
    }
}

/// A share in percent (fractions allowed) as Envoy's, in millionths.
fn percent(p: f64) -> types::FractionalPercent {
    types::FractionalPercent {
        // In 0..=100 (checked by the proxy's compiler): at most 1,000,000.
        numerator: (p.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: types::fractional_percent::DenominatorType::Million as i32,
    }
}

/// The fault filter's name, and its per-route config.
const FAULT: &str = "envoy.filters.http.fault";

/// A route's fault as Envoy's fault filter's (which trellis-proxy's follows: before the route's
/// timeout, a delay then an abort drawn independently).
fn fault(t: &mut Translator, path: &str, f: &pb::Fault, grpc: bool) -> Any {
    use envoy_types::pb::envoy::extensions::filters::{
        common::fault::v3 as common, http::fault::v3 as fault,
    };
    let abort = f.abort.as_ref().map(|a| {
        // One status for every request: a gRPC route's are all gRPC requests.
        let error = if grpc && a.grpc_status != 0 {
            fault::fault_abort::ErrorType::GrpcStatus(a.grpc_status)
        } else {
            if a.grpc_status != 0 {
                t.refuse(
                    format!("{path}.fault.abort.grpcStatus"),
                    "a grpcStatus on a route that also takes requests other than gRPC (Envoy answers one status to all)",
                );
            }
            fault::fault_abort::ErrorType::HttpStatus(a.http_status)
        };
        fault::FaultAbort {
            error_type: Some(error),
            percentage: Some(percent(a.percentage)),
            ..Default::default()
        }
    });
    let delay = f.delay.as_ref().map(|d| common::FaultDelay {
        fault_delay_secifier: duration(d.fixed_delay.as_ref())
            .map(common::fault_delay::FaultDelaySecifier::FixedDelay),
        percentage: Some(percent(d.percentage)),
    });
    let headers = f
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(t, &format!("{path}.fault.headers[{i}]"), h))
        .collect();
    any(&fault::HttpFault {
        delay,
        abort,
        headers,
        ..Default::default()
    })
}

fn http_route(
    t: &mut Translator,
    path: &str,
    r: &pb::Route,
    snapshot: &pb::Snapshot,
) -> route::Route {
    use route::route_match::PathSpecifier;
    let mut m = route::RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    if let Some(rm) = &r.r#match {
        m.path_specifier = Some(match &rm.path {
            Some(pb::route_match::Path::Prefix(p)) => PathSpecifier::Prefix(p.clone()),
            Some(pb::route_match::Path::Exact(p)) => PathSpecifier::Path(p.clone()),
            Some(pb::route_match::Path::Regex(p)) => PathSpecifier::SafeRegex(regex(p)),
            None => PathSpecifier::Prefix("/".into()),
        });
        if let Some(g) = rm.grpc.as_ref().filter(|g| !g.service_name.is_empty()) {
            m.path_specifier = Some(if g.method_name.is_empty() {
                PathSpecifier::Prefix(format!("/{}/", g.service_name))
            } else {
                PathSpecifier::Path(format!("/{}/{}", g.service_name, g.method_name))
            });
        }
        for (i, h) in rm.headers.iter().enumerate() {
            m.headers
                .push(header_matcher(t, &format!("{path}.match.headers[{i}]"), h));
        }
        if !rm.method.is_empty() {
            m.headers.push(header_exact(":method", &rm.method));
        }
        if !rm.scheme.is_empty() {
            m.headers.push(header_exact(":scheme", &rm.scheme));
        }
        for q in &rm.query_parameters {
            use route::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
            let spec = match &q.rule {
                Some(pb::query_parameter_match::Rule::Exact(v)) => Q::StringMatch(string_matcher(
                    matcher::string_matcher::MatchPattern::Exact(v.clone()),
                )),
                Some(pb::query_parameter_match::Rule::Regex(v)) => Q::StringMatch(string_matcher(
                    matcher::string_matcher::MatchPattern::SafeRegex(regex(v)),
                )),
                Some(pb::query_parameter_match::Rule::Present(p)) => Q::PresentMatch(*p),
                None => Q::PresentMatch(true),
            };
            m.query_parameters.push(route::QueryParameterMatcher {
                name: q.name.clone(),
                query_parameter_match_specifier: Some(spec),
            });
        }
        if rm.port != 0 {
            // The authority's port (a name or [IPv6]:PORT); none given: no match, as at
            // trellis-proxy's listeners without traffic capture.
            m.headers.push(route::HeaderMatcher {
                name: ":authority".into(),
                header_match_specifier: Some(
                    route::header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(
                        matcher::string_matcher::MatchPattern::SafeRegex(regex(&format!(
                            "^([^:\\[\\]]*|\\[[^\\]]*\\]):{}$",
                            rm.port
                        ))),
                    )),
                ),
                ..Default::default()
            });
        }
    }
    for (field, set) in [("rateLimit", r.rate_limit.is_some())] {
        if set {
            t.refuse(format!("{path}.{field}"), field);
        }
    }
    let action = match &r.action {
        None => None,
        Some(a) if a.direct_response.is_some() => {
            let d = a.direct_response.as_ref();
            match d {
                Some(d) if d.kind == pb::direct_response::Kind::Static as i32 => Some(
                    route::route::Action::DirectResponse(route::DirectResponseAction {
                        status: d.status,
                        body: (!d.body.is_empty()).then(|| core::DataSource {
                            specifier: Some(core::data_source::Specifier::InlineString(
                                d.body.clone(),
                            )),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                ),
                _ => {
                    t.refuse(
                        format!("{path}.action.directResponse"),
                        "readiness answers (a gateway's health check)",
                    );
                    None
                }
            }
        }
        Some(a) => Some(route::route::Action::Route(route_action(
            t, path, r, a, snapshot,
        ))),
    };
    // A request body kept for retries: trellis-proxy's bound (64 KiB by default).
    let buffer = r
        .retry_policy
        .as_ref()
        .filter(|p| p.max_retries > 0)
        .map(|p| {
            let bytes = if p.buffer_limit_bytes == 0 {
                65_536
            } else {
                p.buffer_limit_bytes
            };
            envoy_types::pb::google::protobuf::UInt64Value { value: bytes }
        });
    let (request_headers_to_add, request_headers_to_remove) =
        header_rules(r.request_headers.as_ref());
    let (response_headers_to_add, response_headers_to_remove) =
        header_rules(r.response_headers.as_ref());
    let grpc = r.r#match.as_ref().is_some_and(|m| m.grpc.is_some());
    route::Route {
        name: r.name.clone(),
        r#match: Some(m),
        action,
        request_body_buffer_limit: buffer,
        typed_per_filter_config: r
            .fault
            .iter()
            .map(|f| (FAULT.to_string(), fault(t, path, f, grpc)))
            .collect(),
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        ..Default::default()
    }
}

/// A route's header rules as Envoy's headers to add and remove (Envoy removes, then adds): a
/// `set` header is removed and added anew (an empty value leaves it removed, as
/// trellis-proxy's), an `add` appended (an empty one adds nothing), a removed one goes; the
/// set and removed ones' `_` spellings go too (trellis-proxy's lookalikes). Variables are
/// Envoy's own but `%PEER_IDENTITY%`, Envoy's `%DOWNSTREAM_PEER_URI_SAN%`.
fn header_rules(rules: Option<&pb::HeaderRules>) -> (Vec<core::HeaderValueOption>, Vec<String>) {
    let Some(rules) = rules else {
        return (Vec::new(), Vec::new());
    };
    use core::header_value_option::HeaderAppendAction;
    let option = |rule: &pb::HeaderValueRule, action: HeaderAppendAction| core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: rule.name.clone(),
            value: envoy_variables(&rule.value),
            ..Default::default()
        }),
        append_action: action as i32,
        keep_empty_value: false,
        ..Default::default()
    };
    let add = rules
        .set
        .iter()
        .map(|r| option(r, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            rules
                .add
                .iter()
                .map(|r| option(r, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect();
    let mut remove: Vec<String> = rules
        .set
        .iter()
        .map(|r| r.name.to_ascii_lowercase())
        .chain(rules.remove.iter().map(|n| n.to_ascii_lowercase()))
        .collect();
    let lookalikes: Vec<String> = remove
        .iter()
        .filter(|n| n.contains('-'))
        .map(|n| n.replace('-', "_"))
        .collect();
    remove.extend(lookalikes);
    (add, remove)
}

/// Envoy's name for one of trellis-proxy's variables or command operators: the caller's
/// identity, and the connection's peer as `DIRECT` — Envoy's plain `DOWNSTREAM_REMOTE_ADDRESS`
/// would read a client's `x-forwarded-for` at a sidecar, where trellis-proxy's is the TCP peer.
fn envoy_operator(name: &str) -> &str {
    match name {
        "PEER_IDENTITY" => "DOWNSTREAM_PEER_URI_SAN",
        "DOWNSTREAM_REMOTE_ADDRESS" => "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
        other => other,
    }
}

/// A header rule's value (or an access log format) with Envoy's operators (`envoy_operator`);
/// `%%` stays a literal `%`.
fn envoy_variables(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('%') {
            out.push_str("%%");
            rest = after;
            continue;
        }
        let Some(end) = rest.find('%') else {
            out.push('%');
            continue;
        };
        let name = &rest[..end];
        out.push('%');
        out.push_str(envoy_operator(name));
        out.push('%');
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A regex rewrite's substitution (the regex crate's: `$1`, `${1}`, `$$`) in RE2's form
/// (`\1`, literal backslashes doubled); None where there is none: named groups, a `$` the regex
/// crate reads otherwise, or a result that might not start with `/` (trellis-proxy adds one,
/// Envoy does not; a substitution starting with `/` keeps every result's).
fn re2_substitution(s: &str) -> Option<String> {
    if !s.starts_with('/') {
        return None;
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i].replace('\\', "\\\\"));
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        // `${NAME}`, else `$NAME` with the longest run of [_0-9A-Za-z] (the regex crate's).
        let (name, after) = match rest.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}')?;
                (&braced[..end], &braced[end + 1..])
            }
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                rest.split_at(end)
            }
        };
        let group: u8 = name.parse().ok().filter(|n| *n <= 9)?;
        out.push('\\');
        out.push_str(&group.to_string());
        rest = after;
    }
    out.push_str(&rest.replace('\\', "\\\\"));
    Some(out)
}

fn route_action(
    t: &mut Translator,
    path: &str,
    r: &pb::Route,
    a: &pb::RouteAction,
    snapshot: &pb::Snapshot,
) -> route::RouteAction {
    for (i, w) in a.weighted_targets.iter().enumerate() {
        let tcp = snapshot
            .clusters
            .iter()
            .any(|c| c.name == w.cluster && c.protocol == pb::cluster::Protocol::TcpOnly as i32);
        if tcp {
            t.refuse(
                format!("{path}.action.weightedTargets[{i}]"),
                "an HTTP route to a tcp node (reached by CONNECT)",
            );
        }
    }
    use route::route_action::ClusterSpecifier;
    // Envoy shadows whole bodies: a body limit asked for has no translation.
    if r.mirror.iter().any(|m| m.max_body_bytes != 0) {
        t.refuse(
            format!("{path}.mirror.maxBodyBytes"),
            "a mirror's body limit (Envoy's shadowing copies whole bodies)",
        );
    }
    // A share of the requests copied to a cluster, the copy's host with `-shadow` (Envoy's
    // shadowing, which trellis-proxy's follows).
    let mirrors = r
        .mirror
        .iter()
        .map(|m| route::route_action::RequestMirrorPolicy {
            cluster: m.cluster.clone(),
            runtime_fraction: Some(core::RuntimeFractionalPercent {
                default_value: Some(percent(m.percentage)),
                runtime_key: String::new(),
            }),
            ..Default::default()
        })
        .collect();
    let mut out = route::RouteAction {
        request_mirror_policies: mirrors,
        cluster_specifier: Some(ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: a
                .weighted_targets
                .iter()
                .filter(|w| w.weight > 0)
                .map(|w| route::weighted_cluster::ClusterWeight {
                    name: w.cluster.clone(),
                    weight: Some(UInt32Value { value: w.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
        // Trellis routes have no request timeout unless one is set (Envoy's default is 15 s).
        timeout: Some(
            r.timeout
                .as_ref()
                .and_then(|t| duration(t.per_request.as_ref()))
                .unwrap_or_default(),
        ),
        idle_timeout: r.timeout.as_ref().and_then(|t| duration(t.idle.as_ref())),
        ..Default::default()
    };
    // Envoy replaces whatever prefix the route matched: only right when that is the rewrite's.
    let grpc = r.r#match.as_ref().is_some_and(|m| m.grpc.is_some());
    let matched_prefix = match r.r#match.as_ref().and_then(|m| m.path.as_ref()) {
        _ if grpc => None,
        Some(pb::route_match::Path::Prefix(p)) => Some(p.as_str()),
        None => Some("/"),
        _ => None,
    };
    if let Some(rw) = &a.path_rewrite {
        if !rw.prefix.is_empty() && matched_prefix != Some(rw.prefix.as_str()) {
            t.refuse(
                format!("{path}.action.pathRewrite.prefix"),
                "a prefix rewrite of another prefix than the route's match",
            );
        } else if !rw.prefix.is_empty() {
            out.prefix_rewrite = rw.replacement.clone();
        } else if !rw.exact.is_empty() {
            // The whole path (its query kept), as Envoy's regex rewrite of the path does.
            out.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                pattern: Some(regex("^.*$")),
                substitution: rw.exact.replace('\\', "\\\\"),
            });
        } else if let Some(substitution) = re2_substitution(&rw.substitution) {
            out.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                pattern: Some(regex(&rw.regex)),
                substitution,
            });
        } else {
            t.refuse(
                format!("{path}.action.pathRewrite.substitution"),
                "a substitution with named groups or groups above 9, or not starting with / (Envoy adds none)",
            );
        }
    }
    if !a.then_path_rewrites.is_empty() {
        t.refuse(
            format!("{path}.action.thenPathRewrites"),
            "a gateway's and its router route's path rewrites together",
        );
    }
    if !a.host_rewrite.is_empty() {
        out.host_rewrite_specifier = Some(
            route::route_action::HostRewriteSpecifier::HostRewriteLiteral(a.host_rewrite.clone()),
        );
    }
    // Without retries, no policy (its per-try timeout included), as trellis-proxy.
    if let Some(p) = r.retry_policy.as_ref().filter(|p| p.max_retries > 0) {
        let mut on: Vec<&str> = Vec::new();
        for (i, e) in p.http_retry_events.iter().enumerate() {
            on.push(match e.as_str() {
                "server-error" => "5xx",
                "gateway-error" => "gateway-error",
                "connect-failure" => "connect-failure",
                "reset" => "reset",
                "refused-stream" => "refused-stream",
                "retriable-status-codes" => "retriable-status-codes",
                other => {
                    t.refuse(format!("{path}.retryPolicy.httpRetryEvents[{i}]"), other);
                    continue;
                }
            });
        }
        if !p.retriable_status_codes.is_empty() && !on.contains(&"retriable-status-codes") {
            on.push("retriable-status-codes");
        }
        for (i, e) in p.grpc_retry_events.iter().enumerate() {
            on.push(match e.as_str() {
                "cancelled" => "cancelled",
                "deadline-exceeded" => "deadline-exceeded",
                "internal" => "internal",
                "resource-exhausted" => "resource-exhausted",
                "unavailable" => "unavailable",
                other => {
                    t.refuse(format!("{path}.retryPolicy.grpcRetryEvents[{i}]"), other);
                    continue;
                }
            });
        }
        if p.budget.is_some() {
            t.refuse(
                format!("{path}.retryPolicy.budget"),
                "a route's retry budget (Envoy's is a cluster's)",
            );
        }
        out.retry_policy = Some(route::RetryPolicy {
            retry_on: on.join(","),
            num_retries: Some(UInt32Value {
                value: p.max_retries,
            }),
            per_try_timeout: duration(p.per_try_timeout.as_ref()),
            retriable_status_codes: p.retriable_status_codes.clone(),
            // A retry goes to another endpoint than those tried, as trellis-proxy's.
            retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: Some(route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
                    &envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate::default(),
                ))),
            }],
            host_selection_retry_max_attempts: 3,
            retry_back_off: p
                .backoff
                .as_ref()
                .map(|b| route::retry_policy::RetryBackOff {
                    base_interval: duration(b.base_interval.as_ref()).or(Some(Duration {
                        seconds: 0,
                        nanos: 25_000_000,
                    })),
                    max_interval: duration(b.max_interval.as_ref()),
                }),
            ..Default::default()
        });
        if p.hedge_on_per_try_timeout {
            t.refuse(
                format!("{path}.retryPolicy.hedgeOnPerRetryTimeout"),
                "hedging (Envoy hedges requests that are not idempotent too)",
            );
        }
    }
    out
}

fn cluster(
    t: &mut Translator,
    path: &str,
    c: &pb::Cluster,
    holder: &Holder,
) -> (cluster::Cluster, Option<endpoint::ClusterLoadAssignment>) {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let lb_policy = match pb::cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(pb::cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(pb::cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        Ok(pb::cluster::LbPolicy::Random) => LbPolicy::Random,
        _ => {
            t.refuse(
                format!("{path}.lbPolicy"),
                "peak EWMA and consistent hashing",
            );
            LbPolicy::RoundRobin
        }
    };
    for (field, set) in [
        ("slowStart", c.slow_start.is_some()),
        ("zoneAware", c.zone_aware.is_some()),
        ("authorityPort", c.authority_port != 0),
        ("ipFamily", c.ip_family != 0),
    ] {
        if set {
            t.refuse(format!("{path}.{field}"), field);
        }
    }
    let assignment = endpoint::ClusterLoadAssignment {
        cluster_name: c.name.clone(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints: c
                .endpoints
                .iter()
                .map(|e| endpoint::LbEndpoint {
                    health_status: match pb::endpoint::Health::try_from(e.health) {
                        Ok(pb::endpoint::Health::Draining) => core::HealthStatus::Draining,
                        Ok(pb::endpoint::Health::Unhealthy) => core::HealthStatus::Unhealthy,
                        _ => core::HealthStatus::Unknown,
                    } as i32,
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: socket(&e.address),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    // Endpoints by IP come over EDS; a DNS name is resolved by Envoy, as the proxy would.
    let by_ip = c.endpoints.iter().all(|e| {
        e.address.rsplit_once(':').is_some_and(|(h, _)| {
            h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok()
        })
    });
    let kind = if by_ip {
        DiscoveryType::Eds
    } else if c.dns == pb::cluster::Dns::Endpoints as i32 {
        DiscoveryType::StrictDns
    } else {
        DiscoveryType::LogicalDns
    };
    let mut out = cluster::Cluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
        connect_timeout: duration(c.connect_timeout.as_ref()).or(Some(Duration {
            seconds: 5,
            nanos: 0,
        })),
        lb_policy: lb_policy as i32,
        // Never to endpoints that are out (failing health checks, ejected, draining), however
        // few are left, as trellis-proxy (Envoy's default panics below 50%).
        common_lb_config: Some(cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(types::Percent { value: 0.0 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(tls) = &c.tls {
        out.transport_socket = upstream_tls(t, &format!("{path}.tls"), tls, c.protocol, holder);
    }
    if kind == DiscoveryType::LogicalDns && c.endpoints.len() > 1 {
        t.refuse(
            format!("{path}.endpoints"),
            "several DNS names resolved per connection (Envoy's LOGICAL_DNS takes one)",
        );
    }
    if by_ip {
        out.eds_cluster_config = Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        });
    } else {
        out.load_assignment = Some(assignment.clone());
    }
    let mut options = upstream_http::HttpProtocolOptions {
        common_http_protocol_options: Some(core::HttpProtocolOptions {
            idle_timeout: duration(c.pool_idle_timeout.as_ref()).or(Some(Duration {
                seconds: 60,
                nanos: 0,
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    use upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig;
    let protocol = match pb::cluster::Protocol::try_from(c.protocol) {
        Ok(pb::cluster::Protocol::Http2 | pb::cluster::Protocol::Grpc) => Some(
            ProtocolConfig::Http2ProtocolOptions(core::Http2ProtocolOptions::default()),
        ),
        Ok(pb::cluster::Protocol::TcpOnly) => None,
        _ => Some(ProtocolConfig::HttpProtocolOptions(
            core::Http1ProtocolOptions::default(),
        )),
    };
    if let Some(protocol) = protocol {
        options.upstream_protocol_options = Some(
            upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                upstream_http::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(protocol),
                },
            ),
        );
        out.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            any(&options),
        );
    }
    if let Some(o) = &c.outlier_detection {
        out.outlier_detection = Some(cluster::OutlierDetection {
            consecutive_5xx: Some(UInt32Value {
                value: o.max_server_errors,
            }),
            interval: duration(o.interval.as_ref()),
            base_ejection_time: duration(o.base_ejection_duration.as_ref()),
            max_ejection_percent: Some(UInt32Value {
                value: o.max_ejection_percent,
            }),
            // Only consecutive 5xx ejects, as in the proxy; a passing health check does not
            // bring an ejected endpoint back early.
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            successful_active_health_check_uneject_host: Some(
                envoy_types::pb::google::protobuf::BoolValue { value: false },
            ),
            enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 0 }),
            ..Default::default()
        });
    }
    // No limits unless set (Envoy's defaults are 1,024).
    let limit = |v: u32| {
        Some(UInt32Value {
            value: if v == 0 { u32::MAX } else { v },
        })
    };
    let pool = c.connection_pool.unwrap_or_default();
    out.circuit_breakers = Some(cluster::CircuitBreakers {
        thresholds: vec![cluster::circuit_breakers::Thresholds {
            max_connections: limit(pool.max_connections),
            max_pending_requests: limit(pool.max_pending_requests),
            max_requests: limit(pool.max_requests),
            max_retries: limit(0),
            ..Default::default()
        }],
        ..Default::default()
    });
    if let Some(h) = &c.health_check {
        use core::health_check::HealthChecker;
        let checker = match pb::health_check::Protocol::try_from(h.protocol) {
            Ok(pb::health_check::Protocol::Grpc) => {
                HealthChecker::GrpcHealthCheck(core::health_check::GrpcHealthCheck::default())
            }
            Ok(pb::health_check::Protocol::Tcp) => {
                HealthChecker::TcpHealthCheck(core::health_check::TcpHealthCheck::default())
            }
            Ok(pb::health_check::Protocol::Http2) => {
                HealthChecker::HttpHealthCheck(core::health_check::HttpHealthCheck {
                    path: if h.path.is_empty() {
                        "/".into()
                    } else {
                        h.path.clone()
                    },
                    codec_client_type: types::CodecClientType::Http2 as i32,
                    ..Default::default()
                })
            }
            _ => HealthChecker::HttpHealthCheck(core::health_check::HttpHealthCheck {
                path: if h.path.is_empty() {
                    "/".into()
                } else {
                    h.path.clone()
                },
                ..Default::default()
            }),
        };
        if matches!(checker, HealthChecker::GrpcHealthCheck(_))
            && !matches!(
                pb::cluster::Protocol::try_from(c.protocol),
                Ok(pb::cluster::Protocol::Http2 | pb::cluster::Protocol::Grpc)
            )
        {
            t.refuse(
                format!("{path}.healthCheck.protocol"),
                "a gRPC health check of an HTTP/1.1 cluster",
            );
        }
        out.health_checks.push(core::HealthCheck {
            timeout: duration(h.timeout.as_ref()),
            interval: duration(h.interval.as_ref()),
            // Probed at the interval whether or not the cluster has traffic.
            no_traffic_interval: duration(h.interval.as_ref()),
            healthy_threshold: Some(UInt32Value {
                value: h.healthy_threshold,
            }),
            unhealthy_threshold: Some(UInt32Value {
                value: h.unhealthy_threshold,
            }),
            alt_port: (h.port != 0).then_some(UInt32Value { value: h.port }),
            health_checker: Some(checker),
            ..Default::default()
        });
    }
    (out, by_ip.then_some(assignment))
}

fn tls_socket<M: Message + Name>(context: &M) -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            context,
        ))),
    }
}

fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

fn file(path: &str) -> core::DataSource {
    core::DataSource {
        specifier: Some(core::data_source::Specifier::Filename(path.into())),
        ..Default::default()
    }
}

fn inline(pem: &str) -> core::DataSource {
    core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(pem.into())),
        ..Default::default()
    }
}

fn files(f: &pb::CertificateFiles) -> tls::TlsCertificate {
    tls::TlsCertificate {
        certificate_chain: Some(file(&f.certificate_chain)),
        private_key: Some(file(&f.private_key)),
        ..Default::default()
    }
}

/// The secrets an Envoy's TLS contexts name: its certificate and key, and the trust bundle.
pub fn identity_secret(chain_pem: &str, key_pem: &str) -> Any {
    any(&tls::Secret {
        name: IDENTITY_SECRET.into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(chain_pem)),
            private_key: Some(inline(key_pem)),
            ..Default::default()
        })),
    })
}

pub fn bundle_secret(bundle_pem: &str) -> Any {
    any(&tls::Secret {
        name: BUNDLE_SECRET.into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: Some(inline(bundle_pem)),
                ..Default::default()
            },
        )),
    })
}

/// Exact matches of `names` among a certificate's SANs: URIs (SPIFFE IDs), else DNS names.
fn san_matchers(names: &[String]) -> Vec<tls::SubjectAltNameMatcher> {
    use tls::subject_alt_name_matcher::SanType;
    names
        .iter()
        .map(|n| tls::SubjectAltNameMatcher {
            san_type: if n.contains("://") {
                SanType::Uri
            } else {
                SanType::Dns
            } as i32,
            matcher: Some(string_matcher(
                matcher::string_matcher::MatchPattern::Exact(n.clone()),
            )),
            ..Default::default()
        })
        .collect()
}

/// How a peer's certificate is checked: against `trust_files` (one file: Envoy takes one
/// trusted_ca) or the mesh's bundle (SDS), for one of `names` (none: any).
fn validation(
    t: &mut Translator,
    path: &str,
    trust_files: &[String],
    names: &[String],
) -> tls::common_tls_context::ValidationContextType {
    use tls::common_tls_context::ValidationContextType;
    let names = san_matchers(names);
    match trust_files {
        [] => ValidationContextType::CombinedValidationContext(
            tls::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(tls::CertificateValidationContext {
                    match_typed_subject_alt_names: names,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(BUNDLE_SECRET)),
                ..Default::default()
            },
        ),
        [one] => ValidationContextType::ValidationContext(tls::CertificateValidationContext {
            trusted_ca: Some(file(one)),
            match_typed_subject_alt_names: names,
            ..Default::default()
        }),
        _ => {
            t.refuse(
                format!("{path}.trustFiles"),
                "several trust files (Envoy takes one trusted_ca file: join them into one)",
            );
            ValidationContextType::ValidationContext(Default::default())
        }
    }
}

/// A listener's TLS, and whether it also takes plaintext (PERMISSIVE); None where it is
/// plaintext only: PERMISSIVE with the workload certificate on an Envoy that has none (as
/// trellis-proxy, whose handshakes fail without one).
fn server_tls(
    t: &mut Translator,
    path: &str,
    server: &pb::ServerTls,
    holder: &Holder,
    http: bool,
    callers: Option<&[String]>,
) -> Option<(core::TransportSocket, bool)> {
    let permissive = server.mode == pb::server_tls::Mode::Permissive as i32;
    let mut common = tls::CommonTlsContext {
        alpn_protocols: if http {
            vec!["h2".into(), "http/1.1".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    match &server.certificate {
        Some(f) => common.tls_certificates = vec![files(f)],
        None if holder.identity => {
            common.tls_certificate_sds_secret_configs = vec![sds(IDENTITY_SECRET)];
        }
        None if permissive => return None,
        None => {
            t.refuse(
                path,
                "TLS with the workload certificate on an Envoy that has none: give it a join token (trellis bootstrap envoy --token)",
            );
            return None;
        }
    }
    if let Some(v) = &server.client_validation {
        common.validation_context_type = Some(validation(
            t,
            &format!("{path}.clientValidation"),
            &v.trust_files,
            callers.unwrap_or(&v.subject_alt_names),
        ));
    }
    let context = tls::DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
            value: server.client_validation.is_some(),
        }),
        ..Default::default()
    };
    Some((tls_socket(&context), permissive))
}

/// TLS toward a cluster's endpoints; None: plaintext (PERMISSIVE while the Envoy has no
/// certificate, as trellis-proxy).
fn upstream_tls(
    t: &mut Translator,
    path: &str,
    upstream: &pb::UpstreamTls,
    protocol: i32,
    holder: &Holder,
) -> Option<core::TransportSocket> {
    let mut common = tls::CommonTlsContext {
        alpn_protocols: match pb::cluster::Protocol::try_from(protocol) {
            Ok(pb::cluster::Protocol::Http2 | pb::cluster::Protocol::Grpc) => vec!["h2".into()],
            Ok(pb::cluster::Protocol::TcpOnly) => Vec::new(),
            _ => vec!["http/1.1".into()],
        },
        ..Default::default()
    };
    match &upstream.certificate {
        Some(f) => common.tls_certificates = vec![files(f)],
        None if upstream.no_certificate => {}
        None if holder.identity => {
            common.tls_certificate_sds_secret_configs = vec![sds(IDENTITY_SECRET)];
        }
        None if upstream.plaintext_without_identity => return None,
        None => {
            t.refuse(
                path,
                "mTLS with the workload certificate on an Envoy that has none: give it a join token (trellis bootstrap envoy --token)",
            );
            return None;
        }
    }
    // A revoked identity is not accepted from the server whatever certificate proves it.
    let mut names: Vec<String> = upstream
        .identities
        .iter()
        .filter(|n| !holder.denied.contains(n))
        .cloned()
        .collect();
    let mesh_trust = upstream.trust_files.is_empty();
    if names.is_empty()
        && (!upstream.identities.is_empty() || mesh_trust && !holder.denied.is_empty())
    {
        // Every name it may carry is revoked, or any mesh identity would do while some are
        // revoked (Envoy cannot take all but those): no certificate passes until then.
        names.push(NO_ONE.into());
    }
    common.validation_context_type = Some(validation(t, path, &upstream.trust_files, &names));
    Some(tls_socket(&tls::UpstreamTlsContext {
        common_tls_context: Some(common),
        ..Default::default()
    }))
}

/// A VirtualNode's or VirtualGateway's access log as Envoy's file access log: the same file,
/// the same command operators (Envoy's own), a line per request; no format: Envoy's default,
/// which is trellis-proxy's too.
fn access_log(log: &pb::AccessLog) -> envoy_types::pb::envoy::config::accesslog::v3::AccessLog {
    use envoy_types::pb::envoy::{
        config::accesslog::v3 as accesslog, extensions::access_loggers::file::v3 as file,
    };
    let format = match &log.format {
        Some(pb::access_log::Format::Text(text)) => {
            // trellis-proxy ends a line whatever the format writes; Envoy writes it as it is.
            let mut text = envoy_variables(text);
            if !text.ends_with('\n') {
                text.push('\n');
            }
            Some(core::substitution_format_string::Format::TextFormatSource(
                inline(&text),
            ))
        }
        Some(pb::access_log::Format::Json(json)) => {
            Some(core::substitution_format_string::Format::JsonFormat(
                envoy_types::pb::google::protobuf::Struct {
                    fields: json
                        .fields
                        .iter()
                        .map(|f| {
                            (
                                f.key.clone(),
                                envoy_types::pb::google::protobuf::Value {
                                    kind: Some(ValueKind::StringValue(envoy_variables(&f.value))),
                                },
                            )
                        })
                        .collect(),
                },
            ))
        }
        None => None,
    };
    let config = file::FileAccessLog {
        path: log.path.clone(),
        access_log_format: format.map(|format| {
            file::file_access_log::AccessLogFormat::LogFormat(core::SubstitutionFormatString {
                format: Some(format),
                ..Default::default()
            })
        }),
    };
    accesslog::AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(accesslog::access_log::ConfigType::TypedConfig(any(&config))),
        ..Default::default()
    }
}

/// The cluster (and route) of a sidecar egress's passthrough (a mesh's `egressFilter: ALLOW_ALL`).
const PASSTHROUGH: &str = "passthrough";

/// The DNS cache the passthrough's filter and cluster share (they must be configured alike).
fn dns_cache()
-> envoy_types::pb::envoy::extensions::common::dynamic_forward_proxy::v3::DnsCacheConfig {
    envoy_types::pb::envoy::extensions::common::dynamic_forward_proxy::v3::DnsCacheConfig {
        name: PASSTHROUGH.into(),
        dns_lookup_family: cluster::cluster::DnsLookupFamily::V4Preferred as i32,
        ..Default::default()
    }
}

/// Envoy's dynamic forward proxy cluster: each request to the host (and port, 80 without one)
/// its authority names; no limits.
fn passthrough_cluster() -> cluster::Cluster {
    use envoy_types::pb::envoy::extensions::clusters::dynamic_forward_proxy::v3 as dfp;
    let config = dfp::ClusterConfig {
        cluster_implementation_specifier: Some(
            dfp::cluster_config::ClusterImplementationSpecifier::DnsCacheConfig(dns_cache()),
        ),
        ..Default::default()
    };
    let unlimited = Some(UInt32Value { value: u32::MAX });
    cluster::Cluster {
        name: PASSTHROUGH.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::ClusterType(
            cluster::cluster::CustomClusterType {
                name: "envoy.clusters.dynamic_forward_proxy".into(),
                typed_config: Some(any(&config)),
            },
        )),
        lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(Duration {
            seconds: 5,
            nanos: 0,
        }),
        circuit_breakers: Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: unlimited,
                max_pending_requests: unlimited,
                max_requests: unlimited,
                max_retries: unlimited,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A name no certificate carries (`.invalid` is reserved): a check only it passes fails.
const NO_ONE: &str = "revoked.invalid";

/// RBAC rules with one policy: any request of a caller whose verified certificate's URI SAN
/// is one of `identities` (none: no one).
fn rbac_rules(action: rbac::rbac::Action, identities: &[String]) -> rbac::Rbac {
    let principals: Vec<rbac::Principal> = identities
        .iter()
        .map(|id| rbac::Principal {
            identifier: Some(rbac::principal::Identifier::Authenticated(
                rbac::principal::Authenticated {
                    principal_name: Some(string_matcher(
                        matcher::string_matcher::MatchPattern::Exact(id.clone()),
                    )),
                },
            )),
        })
        .collect();
    let mut policies = std::collections::HashMap::new();
    if !principals.is_empty() {
        policies.insert(
            "identities".to_string(),
            rbac::Policy {
                permissions: vec![rbac::Permission {
                    rule: Some(rbac::permission::Rule::Any(true)),
                }],
                principals,
                ..Default::default()
            },
        );
    }
    rbac::Rbac {
        action: action as i32,
        policies,
        ..Default::default()
    }
}

/// How `trellis bootstrap envoy` writes an Envoy's bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `NAMESPACE/NAME` of the VirtualNode (or VirtualGateway).
    pub node: String,
    pub gateway: bool,
    /// The control plane: `http://HOST:PORT` or `https://HOST:PORT`.
    pub control_plane: String,
    /// For `https`: the PEM file of the CA its certificate chains to.
    pub control_plane_ca: Option<String>,
    pub addresses: Addresses,
    pub admin: std::net::SocketAddr,
    /// A join token for the node, sent on each ADS stream (`x-trellis-join-token`).
    pub join_token: Option<String>,
}

impl Bootstrap {
    /// The bootstrap (YAML): the node, the admin listener, ADS to the control plane for
    /// listeners and clusters (state of the world, API v3).
    pub fn yaml(&self) -> Result<String, String> {
        let (scheme, rest) = self.control_plane.split_once("://").ok_or_else(|| {
            format!(
                "{:?} is not http://HOST:PORT or https://HOST:PORT",
                self.control_plane
            )
        })?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("{:?} has no port", self.control_plane))?;
        let by_ip = host.parse::<std::net::IpAddr>().is_ok();
        let tls = match (scheme, &self.control_plane_ca) {
            ("http", _) => String::new(),
            ("https", Some(ca)) => format!(
                "    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: {host}\n        common_tls_context:\n          alpn_protocols: [h2]\n          validation_context:\n            trusted_ca: {{ filename: {ca:?} }}\n"
            ),
            ("https", None) => {
                return Err("an https control plane needs its CA (--control-plane-ca)".into());
            }
            (other, _) => {
                return Err(format!(
                    "{other:?}: the control plane is http:// or https://"
                ));
            }
        };
        Ok(format!(
            "# Envoy bootstrap for {node} (trellis bootstrap envoy): its listeners, routes, clusters\n\
             # and endpoints come from trellis-control over ADS.\n\
             node:\n  id: {node:?}\n  cluster: {node:?}\n  metadata:\n    TRELLIS_INGRESS: \"{ingress}\"\n    TRELLIS_EGRESS: \"{egress}\"\n    TRELLIS_GATEWAY: {gateway}\n\
             admin:\n  address: {{ socket_address: {{ address: {admin_ip}, port_value: {admin_port} }} }}\n\
             dynamic_resources:\n  ads_config:\n    api_type: GRPC\n    transport_api_version: V3\n    set_node_on_first_message_only: true\n    grpc_services: [{{ envoy_grpc: {{ cluster_name: trellis-control }}{metadata} }}]\n  \
             cds_config: {{ ads: {{}}, resource_api_version: V3 }}\n  lds_config: {{ ads: {{}}, resource_api_version: V3 }}\n\
             static_resources:\n  clusters:\n  - name: trellis-control\n    type: {kind}\n    connect_timeout: 5s\n    \
             typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        \
             explicit_http_config: {{ http2_protocol_options: {{}} }}\n    \
             load_assignment:\n      cluster_name: trellis-control\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }} }}] }}]\n{tls}",
            node = self.node,
            ingress = self.addresses.ingress,
            egress = self.addresses.egress,
            gateway = self.gateway,
            admin_ip = self.admin.ip(),
            admin_port = self.admin.port(),
            kind = if by_ip { "STATIC" } else { "STRICT_DNS" },
            metadata = match &self.join_token {
                Some(token) => format!(
                    ", initial_metadata: [{{ key: {JOIN_TOKEN_HEADER}, value: {token:?} }}]"
                ),
                None => String::new(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::re2_substitution;

    /// Header rule values keep their text and `%%`, and name the caller's identity as Envoy.
    #[test]
    fn header_values_in_envoys_variables() {
        for (ours, envoys) in [
            ("fixed", "fixed"),
            ("%ROUTE_NAME%", "%ROUTE_NAME%"),
            ("id=%PEER_IDENTITY%;", "id=%DOWNSTREAM_PEER_URI_SAN%;"),
            ("100%% %PEER_IDENTITY%", "100%% %DOWNSTREAM_PEER_URI_SAN%"),
            ("%%PEER_IDENTITY%%", "%%PEER_IDENTITY%%"),
        ] {
            assert_eq!(super::envoy_variables(ours), envoys, "{ours}");
        }
    }

    /// The regex crate's group references in RE2's form, and what has none refused.
    #[test]
    fn substitutions_in_re2s_form() {
        for (ours, re2) in [
            ("/avatars/$1.png", Some(r"/avatars/\1.png")),
            ("/a/${2}x", Some(r"/a/\2x")),
            ("/cost/$$5", Some("/cost/$5")),
            (r"/back\slash", Some(r"/back\\slash")),
            ("/plain", Some("/plain")),
            // A group named `1x`, named groups, groups above 9, a result without its `/`.
            ("/$1x", None),
            ("/${name}", None),
            ("/$10", None),
            ("$1/after", None),
            ("/${1", None),
        ] {
            assert_eq!(re2_substitution(ours).as_deref(), re2, "{ours}");
        }
    }
}
