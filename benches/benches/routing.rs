//! Micro-benchmarks of the request path's pure parts: virtual-host lookup, route matching,
//! weighted target choice and endpoint picking, on snapshots compiled by the real compiler.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use trellis_proxy::{
    metrics::ProxyMetrics,
    route::{MatchInput, RouteTable},
    snapshot::{self, ListenerKind, Runtime, SnapshotStore},
};

/// `hosts` virtual hosts of `routes` routes each; route i matches prefix /svc{i}/ and a header.
fn snapshot_yaml(hosts: usize, routes: usize, endpoints: usize) -> String {
    let mut y = String::from(
        "version: bench\nlisteners:\n  - name: egress\n    role: EGRESS\n    virtualHosts:\n",
    );
    for h in 0..hosts {
        y += &format!(
            "      - name: h{h}\n        domains: ['svc{h}.default:9080', 'svc{h}.default']\n        routes:\n"
        );
        for r in 0..routes {
            y += &format!(
                "          - name: r{r}\n            priority: {r}\n            match: {{ prefix: /svc{r}/, headers: [{{ name: x-tenant, prefix: t{r} }}] }}\n            action: {{ weightedTargets: [{{ cluster: a, weight: 90 }}, {{ cluster: b, weight: 10 }}] }}\n"
            );
        }
        y += "          - name: regex\n            priority: 1000\n            match: { regex: '/users/[0-9]+/orders' }\n            action: { weightedTargets: [{ cluster: a, weight: 1 }] }\n";
    }
    y += "clusters:\n";
    for c in ["a", "b"] {
        y += &format!("  - name: {c}\n    lbPolicy: LEAST_REQUEST\n    endpoints: [");
        for e in 0..endpoints {
            y += &format!("{{ address: '127.0.0.1:{}' }}, ", 20000 + e);
        }
        y += "]\n";
    }
    y
}

fn compile(hosts: usize, routes: usize, endpoints: usize) -> std::sync::Arc<Runtime> {
    let store = SnapshotStore::new(ProxyMetrics::new(&prometheus::Registry::new()).unwrap());
    let snap = snapshot::parse(&snapshot_yaml(hosts, routes, endpoints)).unwrap();
    store.apply(&snap, |_| Ok(())).unwrap()
}

fn table(rt: &Runtime) -> &RouteTable {
    match rt.egress.as_ref().map(|l| &l.kind) {
        Some(ListenerKind::Http(t)) => t,
        _ => unreachable!("egress is HTTP"),
    }
}

fn routing(c: &mut Criterion) {
    let rt = compile(100, 20, 3);
    let t = table(&rt);
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("t0-acme"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    let first = MatchInput {
        method: &Method::GET,
        path: "/svc0/items",
        query: None,
        headers: &headers,
        port: Some(9080),
        scheme: None,
    };
    let regex = MatchInput {
        path: "/users/42/orders",
        ..first
    };
    let miss = MatchInput {
        path: "/nothing/here",
        ..first
    };

    let mut g = c.benchmark_group("route");
    g.bench_function("host_exact_of_100", |b| {
        b.iter(|| black_box(t.host(black_box("svc57.default:9080"))))
    });
    g.bench_function("host_without_port_of_100", |b| {
        b.iter(|| black_box(t.host(black_box("svc57.default:80"))))
    });
    let host = t.host("svc57.default:9080").unwrap();
    g.bench_function("match_first_of_21", |b| {
        b.iter(|| black_box(host.route(black_box(&first))))
    });
    g.bench_function("match_regex_after_20", |b| {
        b.iter(|| black_box(host.route(black_box(&regex))))
    });
    g.bench_function("miss_all_21", |b| {
        b.iter(|| black_box(host.route(black_box(&miss))))
    });
    g.finish();

    let route = host.route(&first).unwrap();
    let mut g = c.benchmark_group("pick");
    g.bench_function("weighted_target_90_10", |b| {
        b.iter(|| black_box(route.targets.pick()))
    });
    let small = compile(1, 1, 3);
    let cluster3 = &small.clusters[0];
    g.bench_function("least_request_of_3", |b| {
        b.iter(|| black_box(cluster3.pick(&[], None)))
    });
    let big = compile(1, 1, 100);
    let cluster100 = &big.clusters[0];
    g.bench_function("least_request_of_100", |b| {
        b.iter(|| black_box(cluster100.pick(&[], None)))
    });
    let avoid = [cluster3.healthy[0].clone(), cluster3.healthy[1].clone()];
    g.bench_function("least_request_of_3_avoiding_2", |b| {
        b.iter(|| black_box(cluster3.pick(&avoid, None)))
    });
    g.finish();

    let mut g = c.benchmark_group("compile");
    let yaml = snapshot_yaml(100, 20, 3);
    g.sample_size(20);
    g.bench_function("parse_and_compile_100_hosts_2100_routes", |b| {
        let store = SnapshotStore::new(ProxyMetrics::new(&prometheus::Registry::new()).unwrap());
        b.iter(|| {
            let snap = snapshot::parse(&yaml).unwrap();
            black_box(store.apply(&snap, |_| Ok(())).unwrap());
        })
    });
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
