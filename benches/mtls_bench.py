#!/usr/bin/env python3
"""mTLS between two sidecars, side by side: trellis-proxy and Envoy, each as a pair — a client
sidecar (plaintext from the load generator, mTLS out) and a server sidecar (mTLS in, plaintext to
the upstream) — with the same certificates (ECDSA P-256, SPIFFE URI SANs, each side checking the
other's), and Envoy's pair in plaintext as the baseline the issue names.

Both sidecars of a pair run one worker each, pinned to core 0 (their CPU is summed); the upstream
and the load generators run on core 1. Rounds are interleaved and the table reports medians:

  1. HTTP/1.1 keep-alive throughput through the pair (wrk) and the pair's CPU time per request;
  2. latency p50/p99/p99.9 at a fixed rate (oha, latency-corrected) and the p99 added by the pair
     over the upstream alone;
  3. TLS handshakes per second of the server sidecar's CPU: `openssl s_time` opening new
     connections (full handshakes, with the client certificate) and resuming sessions, for a
     fixed time, divided by the server sidecar's CPU seconds over that time.

    benches/mtls_bench.py [--rounds 3] [--duration 10] [--rate 2000]

Needs what benches/proxy_bench.py installs (wrk, oha, envoy, taskset) and openssl.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402

SERVER_ID = "spiffe://bench.local/ns/default/vn/server"
CLIENT_ID = "spiffe://bench.local/ns/default/vn/client"


def certs(tmp):
    """A CA, and a server and a client certificate whose only names are their SPIFFE IDs."""
    def run(*a):
        subprocess.run(a, cwd=tmp, check=True, capture_output=True)

    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run("openssl", "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench root", "-days", "2",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        "-out", "ca.pem")
    for name, spiffe in [("server", SERVER_ID), ("client", CLIENT_ID)]:
        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.ec")
        run("openssl", "pkcs8", "-topk8", "-nocrypt", "-in", f"{name}.ec", "-out", f"{name}.key")
        run("openssl", "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
        with open(os.path.join(tmp, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=URI:{spiffe}\nextendedKeyUsage=serverAuth,clientAuth\n"
                    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
        with open(os.path.join(tmp, f"{name}.pem"), "w") as out:
            for part in (f"{name}.crt", "ca.pem"):
                with open(os.path.join(tmp, part)) as f:
                    out.write(f.read())
    return {k: os.path.join(tmp, v) for k, v in {
        "ca": "ca.pem", "server": "server.pem", "server_key": "server.key",
        "client": "client.pem", "client_key": "client.key"}.items()}


# ---- trellis-proxy: the snapshots a pair of sidecars runs (App Mesh-style file certificates) ----

TRELLIS_CLIENT = """version: bench
listeners:
  - name: egress
    role: EGRESS
    virtualHosts:
      - name: bench
        domains: ["bench.local", "bench.local:80"]
        routes:
          - name: default
            match: {{ prefix: / }}
            action: {{ weightedTargets: [{{ cluster: server, weight: 100 }}] }}
            retryPolicy: {{ maxRetries: 2, perTryTimeout: 1s, httpRetryEvents: [gateway-error, connect-failure] }}
            timeout: {{ perRequest: 15s }}
clusters:
  - name: server
    endpoints: [{{ address: "127.0.0.1:{server}" }}]
    tls:
      {tls}
"""

TRELLIS_SERVER = """version: bench
listeners:
  - name: ingress
    role: INGRESS
    {tls}
    virtualHosts:
      - name: inbound
        domains: ["*"]
        routes:
          - name: inbound
            match: {{ prefix: / }}
            action: {{ weightedTargets: [{{ cluster: local, weight: 100 }}] }}
            timeout: {{ perRequest: 15s }}
clusters:
  - name: local
    endpoints: [{{ address: "{upstream}" }}]
"""


def trellis_pair(upstream, c, tmp, mtls=True):
    server_port, client_port = pb.free_port(), pb.free_port()
    server_tls = ("tls: {{ mode: STRICT, certificate: {{ certificateChain: {server}, privateKey: {key} }}, "
                  "clientValidation: {{ trustFiles: [{ca}], subjectAltNames: [\"{client_id}\"] }} }}").format(
        server=c["server"], key=c["server_key"], ca=c["ca"], client_id=CLIENT_ID) if mtls else ""
    client_tls = ("{{ identities: [\"{server_id}\"], certificate: {{ certificateChain: {client}, privateKey: {key} }}, "
                  "trustFiles: [{ca}] }}").format(server_id=SERVER_ID, client=c["client"], key=c["client_key"],
                                                  ca=c["ca"]) if mtls else "null"
    paths = {}
    for name, text in [("server", TRELLIS_SERVER.format(tls=server_tls, upstream=upstream)),
                       ("client", TRELLIS_CLIENT.format(tls=client_tls, server=server_port))]:
        paths[name] = os.path.join(tmp, f"trellis-{name}.yaml")
        with open(paths[name], "w") as f:
            f.write(text)
    binary = os.path.join(pb.TARGET, "dist", "trellis-proxy")
    common = ["--workers", "1", "--admin-addr", f"127.0.0.1:{pb.free_port()}", "--log", "warn"]
    server = pb.spawn([binary, "--snapshot", paths["server"], "--ingress-addr", f"127.0.0.1:{server_port}",
                       "--egress-addr", f"127.0.0.1:{pb.free_port()}"] + common, pb.PROXY_CPU)
    common = ["--workers", "1", "--admin-addr", f"127.0.0.1:{pb.free_port()}", "--log", "warn"]
    client = pb.spawn([binary, "--snapshot", paths["client"], "--egress-addr", f"127.0.0.1:{client_port}",
                       "--ingress-addr", f"127.0.0.1:{pb.free_port()}"] + common, pb.PROXY_CPU)
    return [client, server], client_port, server_port


# ---- Envoy: the same pair ---------------------------------------------------------------------

ENVOY_HCM = """
          - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                  stat_prefix: {name}
                  codec_type: AUTO
                  route_config:
                    virtual_hosts:
                      - name: bench
                        domains: ["*"]
                        routes:
                          - match: {{ prefix: / }}
                            route:
                              cluster: next
                              timeout: 15s
                              {retry}
                  http_filters:
                    - name: envoy.filters.http.router
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{socket}"""

ENVOY = """admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
    - name: {name}
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:{hcm}
  clusters:
    - name: next
      type: STATIC
      connect_timeout: 5s
      load_assignment:
        cluster_name: next
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {next_port} }} }} }}
{upstream_socket}"""

ENVOY_DOWNSTREAM_TLS = """            transport_socket:
              name: envoy.transport_sockets.tls
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
                require_client_certificate: true
                common_tls_context:
                  alpn_protocols: ["h2", "http/1.1"]
                  tls_certificates: [{{ certificate_chain: {{ filename: {cert} }}, private_key: {{ filename: {key} }} }}]
                  validation_context:
                    trusted_ca: {{ filename: {ca} }}
                    match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ exact: "{peer}" }} }}]
"""

ENVOY_UPSTREAM_TLS = """      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: ["http/1.1"]
            tls_certificates: [{{ certificate_chain: {{ filename: {cert} }}, private_key: {{ filename: {key} }} }}]
            validation_context:
              trusted_ca: {{ filename: {ca} }}
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ exact: "{peer}" }} }}]
"""


def envoy_pair(upstream, c, tmp, mtls=True):
    server_port, client_port = pb.free_port(), pb.free_port()
    retry = 'retry_policy: { retry_on: "gateway-error,connect-failure", num_retries: 2, per_try_timeout: 1s }'
    server = ENVOY.format(
        admin=pb.free_port(), name="server", port=server_port, next_port=upstream.split(":")[1],
        hcm=ENVOY_HCM.format(name="server", retry="", socket=ENVOY_DOWNSTREAM_TLS.format(
            cert=c["server"], key=c["server_key"], ca=c["ca"], peer=CLIENT_ID) if mtls else ""),
        upstream_socket="")
    client = ENVOY.format(
        admin=pb.free_port(), name="client", port=client_port, next_port=server_port,
        hcm=ENVOY_HCM.format(name="client", retry=retry, socket=""),
        upstream_socket=ENVOY_UPSTREAM_TLS.format(
            cert=c["client"], key=c["client_key"], ca=c["ca"], peer=SERVER_ID) if mtls else "")
    procs = []
    for name, text in [("server", server), ("client", client)]:
        path = os.path.join(tmp, f"envoy-{name}.yaml")
        with open(path, "w") as f:
            f.write(text)
        procs.append(pb.spawn(["envoy", "-c", path, "--concurrency", "1", "--log-level", "warn",
                               "--base-id", str((os.getpid() + len(procs) * 7 + (0 if mtls else 3)) % 60000)],
                              pb.PROXY_CPU))
    return procs[::-1], client_port, server_port


PAIRS = {
    "trellis-mtls": lambda up, c, tmp: trellis_pair(up, c, tmp, True),
    "envoy-mtls": lambda up, c, tmp: envoy_pair(up, c, tmp, True),
    "envoy-plain": lambda up, c, tmp: envoy_pair(up, c, tmp, False),
    "trellis-plain": lambda up, c, tmp: trellis_pair(up, c, tmp, False),
}


def handshakes(port, c, duration, reuse):
    """Connections per second `openssl s_time` makes to `port` (new or resumed sessions)."""
    out = subprocess.run(pb.pinned(pb.LOAD_CPU, [
        "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-cert", c["client"], "-key", c["client_key"],
        "-CAfile", c["ca"], "-time", str(duration), "-reuse" if reuse else "-new"]),
        capture_output=True, text=True).stdout
    m = re.findall(r"(\d+) connections in ([\d.]+)s", out)
    return int(m[-1][0]) if m else 0


def run_pair(name, upstream, c, args, tmp):
    procs, port, server_port = PAIRS[name](upstream, c, tmp)
    try:
        pb.wait_http(port)
        ticks = lambda: sum(sum(pb.cpu_ticks(p.pid)) for p in procs)  # noqa: E731
        t0 = ticks()
        rps, total, errors = pb.wrk(port, args.duration, args.connections)
        cpu_us = (ticks() - t0) * 1e6 / pb.CLK / max(total, 1)
        p50, p99, p999 = pb.oha(port, args.duration, args.rate)
        out = {"rps": rps, "errors": errors, "cpu_us": cpu_us, "p50": p50, "p99": p99, "p999": p999,
               "full_hs": None, "resumed_hs": None}
        if name.endswith("mtls"):
            server = procs[1]
            for key, reuse in [("full_hs", False), ("resumed_hs", True)]:
                s0 = sum(pb.cpu_ticks(server.pid))
                n = handshakes(server_port, c, args.duration, reuse)
                secs = max(sum(pb.cpu_ticks(server.pid)) - s0, 1) / pb.CLK
                out[key] = n / secs
        return out
    finally:
        for p in procs:
            pb.stop(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--only", default=",".join(PAIRS))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n in PAIRS]
    pb.setup()
    if not shutil.which("openssl"):
        subprocess.run("apt-get install -y -qq openssl", shell=True, check=True)
    tmp = tempfile.mkdtemp(prefix="trellis-mtls-bench-")
    c = certs(tmp)
    up = pb.spawn([os.path.join(pb.TARGET, "dist", "bench-upstream"), "127.0.0.1:0"], pb.LOAD_CPU,
                  stdout=subprocess.PIPE)
    upstream = up.stdout.readline().decode().strip()
    results = {n: [] for n in names}
    try:
        none = []
        for r in range(args.rounds):
            none.append(pb.oha(int(upstream.split(":")[1]), args.duration, args.rate)[1])
            for n in names:
                pb.log(f"==> round {r + 1}/{args.rounds}: {n}")
                results[n].append(run_pair(n, upstream, c, args, tmp))
    finally:
        for p in pb.started:
            pb.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {n: {k: pb.median([x[k] for x in results[n]]) for k in results[n][0]} for n in names}
    base_p99 = pb.median(none)

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    def ratio(n, k, base):
        b = med.get(base, {}).get(k)
        v = med[n][k]
        return "—" if not b or v is None else f"{v / b:.2f}"

    print(f"Medians of {args.rounds} interleaved rounds; {args.duration} s per measurement; both sidecars of a "
          f"pair on CPU {pb.PROXY_CPU} (their CPU summed), upstream and load on CPU {pb.LOAD_CPU}; "
          f"wrk -c{args.connections}; oha at {args.rate} req/s; upstream alone p99 {base_p99:.3f} ms.")
    print()
    print("| pair | req/s | CPU µs/req (both sidecars) | ×envoy-plain | p50 ms | p99 ms | p99.9 ms | +p99 vs upstream | "
          "full handshakes/s/core | resumed/s/core |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        print(f"| {n} | {fmt(m['rps'], '.0f')} | {fmt(m['cpu_us'], '.1f')} | {ratio(n, 'cpu_us', 'envoy-plain')} | "
              f"{fmt(m['p50'], '.3f')} | {fmt(m['p99'], '.3f')} | {fmt(m['p999'], '.3f')} | "
              f"{fmt(None if m['p99'] is None else m['p99'] - base_p99, '+.3f')} | "
              f"{fmt(m['full_hs'], '.0f')} | {fmt(m['resumed_hs'], '.0f')} |")
    errors = {n: sum(x["errors"] for x in results[n]) for n in names}
    if any(errors.values()):
        print(f"\nNon-2xx responses during wrk runs: {errors}")


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in pb.started:
            pb.stop(p)
