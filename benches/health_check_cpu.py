#!/usr/bin/env python3
"""CPU cost of active health checks: trellis-proxy (dist build) with one cluster of N endpoints
(default 1,000; each a socket of its own served by bench-upstream) and an HTTP health check at
App Mesh's minimum interval (5 s). After a warm-up of one interval and a bit (the first probes all
run at once when the endpoints appear; later ones are spread over the interval), the proxy's CPU
time (user + system, from /proc/PID/stat) is read over WINDOW seconds (default 60), with the
probes the proxy counted in that window. No request traffic: the cost is the checkers'.

    cargo build --profile dist -p trellis-benches --bin bench-upstream && cargo build --profile dist -p trellis-proxy
    python3 benches/health_check_cpu.py [N] [WINDOW] [PROTOCOL]

PROTOCOL: HTTP (default), HTTP2, TCP, or NONE (the same proxy without a health check: the
baseline). WORKERS=N sets --workers (default 2, the proxy's default).
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "dist")
INTERVAL = 5.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """(user, system) CPU seconds of the process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based) of the whole line; 12 and 13 after ")".
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def probes(admin):
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    total = {}
    for m in re.finditer(r'^trellis_proxy_health_checks_total\{cluster="app",result="(\w+)"\} (\S+)$', text, re.M):
        total[m.group(1)] = float(m.group(2))
    return total


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    protocol = sys.argv[3] if len(sys.argv) > 3 else "HTTP"
    procs = []
    try:
        upstream = subprocess.Popen([os.path.join(BIN, "bench-upstream"), "127.0.0.1:0", str(n)],
                                    stdout=subprocess.PIPE, text=True)
        procs.append(upstream)
        addrs = [upstream.stdout.readline().strip() for _ in range(n)]
        path = "path: /health, " if protocol in ("HTTP", "HTTP2") else ""
        check = (f"    healthCheck: {{ protocol: {protocol}, {path}interval: 5s, timeout: 2s, "
                 "healthyThreshold: 2, unhealthyThreshold: 2 }\n") if protocol != "NONE" else ""
        eps = ", ".join(f'{{ address: "{a}" }}' for a in addrs)
        snapshot = f"""version: hc-bench
listeners:
  - name: egress
    role: EGRESS
    virtualHosts:
      - name: bench
        domains: ["bench.local"]
        routes:
          - name: default
            match: {{ prefix: / }}
            action: {{ weightedTargets: [{{ cluster: app, weight: 100 }}] }}
clusters:
  - name: app
{check}    endpoints: [{eps}]
"""
        tmp = tempfile.mkdtemp()
        snap = os.path.join(tmp, "snapshot.yaml")
        with open(snap, "w") as f:
            f.write(snapshot)
        admin = f"127.0.0.1:{free_port()}"
        proxy = subprocess.Popen([os.path.join(BIN, "trellis-proxy"), "--snapshot", snap,
                                  "--egress-addr", f"127.0.0.1:{free_port()}",
                                  "--ingress-addr", f"127.0.0.1:{free_port()}",
                                  "--admin-addr", admin, "--log", "warn",
                                  "--workers", os.environ.get("WORKERS", "2")])
        procs.append(proxy)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{admin}/ready", timeout=1)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(INTERVAL * 1.5)
        before, cpu0, t0 = probes(admin), cpu_seconds(proxy.pid), time.monotonic()
        time.sleep(window)
        after, cpu1, t1 = probes(admin), cpu_seconds(proxy.pid), time.monotonic()
        elapsed = t1 - t0
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        cpu = user + system
        done = {k: after.get(k, 0) - before.get(k, 0) for k in ("success", "failure")}
        print(f"endpoints: {n}, protocol: {protocol}, interval: 5s, window: {elapsed:.1f} s")
        print(f"probes in the window: {done['success']:.0f} succeeded, {done['failure']:.0f} failed "
              f"(expected about {n * elapsed / INTERVAL:.0f})")
        print(f"proxy CPU: {cpu:.2f} s over {elapsed:.1f} s = {100 * cpu / elapsed:.2f} % of one core "
              f"({1e6 * cpu / max(1, sum(done.values())):.0f} µs per probe; user {user:.2f} s, system {system:.2f} s)")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
