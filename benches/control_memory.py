#!/usr/bin/env python3
"""Control-plane memory and apply time with many resources.

Starts the real `trellis-control` binary (release build) on an ephemeral port with a fresh data
directory, applies RESOURCES mesh resources through the real HTTP API (`POST /v1/apply`, BATCH
resources per request, after one Mesh), then applies SINGLES one-resource changes against the full
store, and reports the control plane's memory from /proc/PID/status: VmHWM (peak RSS) and VmRSS
after the applies settle.

    cargo build --release -p trellis-control
    python3 benches/control_memory.py --binary target/release/trellis-control

Resources come in groups of four per app: a VirtualNode (registry discovery, a backend on the
previous app's service), a second VirtualNode (the app's v2), a VirtualRouter splitting 90/10
between them with a retry policy, and the VirtualService the router provides.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

API = "mesh.trellis.dev/v1beta1"


def app_resources(i):
    """The four resources of app `i` (JSON is YAML too)."""
    name = f"app-{i}"
    node = {
        "apiVersion": API,
        "kind": "VirtualNode",
        "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
        "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {
                "registry": {
                    "namespaceName": "bench",
                    "serviceName": name,
                    "attributes": {"version": "v1"},
                }
            },
            "backends": (
                [{"virtualService": {"virtualServiceRef": {"name": f"app-{i - 1}"}}}]
                if i > 0
                else []
            ),
        },
    }
    v2 = {
        "apiVersion": API,
        "kind": "VirtualNode",
        "metadata": {"name": f"{name}-v2", "namespace": "bench"},
        "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {
                "registry": {
                    "namespaceName": "bench",
                    "serviceName": name,
                    "attributes": {"version": "v2"},
                }
            },
        },
    }
    router = {
        "apiVersion": API,
        "kind": "VirtualRouter",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "routes": [
                {
                    "name": "split",
                    "httpRoute": {
                        "match": {"prefix": "/"},
                        "action": {
                            "weightedTargets": [
                                {"virtualNodeRef": {"name": name}, "weight": 90},
                                {"virtualNodeRef": {"name": f"{name}-v2"}, "weight": 10},
                            ]
                        },
                        "retryPolicy": {
                            "maxRetries": 2,
                            "perRetryTimeout": {"unit": "ms", "value": 1000},
                            "httpRetryEvents": ["gateway-error"],
                        },
                        "timeout": {"perRequest": {"unit": "s", "value": 5}},
                    },
                }
            ],
        },
    }
    service = {
        "apiVersion": API,
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "hostname": f"{name}.bench",
            "provider": {"virtualRouter": {"virtualRouterRef": {"name": name}}},
        },
    }
    return [node, v2, router, service]


def stream(docs):
    return "\n---\n".join(json.dumps(d) for d in docs).encode()


def post(base, path, body):
    req = urllib.request.Request(
        base + path, data=body, method="POST", headers={"content-type": "application/yaml"}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit(f"POST {path}: {e.code}: {e.read().decode(errors='replace')[:2000]}")


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=600) as r:
        return json.load(r)


def status_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


class Sampler(threading.Thread):
    """Samples VmRSS every 20 ms (VmHWM is the kernel's own peak; this is a cross-check)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, status_kib(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return


def start(binary, data_dir):
    proc = subprocess.Popen(
        [binary, "--data-dir", data_dir, "--listen", "127.0.0.1:0", "--log", "info"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        m = re.search(r"addr=(127\.0\.0\.1:\d+)", line)
        if m:
            # Keep draining stderr so the control plane never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, f"http://{m.group(1)}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit("trellis-control did not report its address")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default="target/release/trellis-control")
    p.add_argument("--resources", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=100, help="resources per apply request")
    p.add_argument("--singles", type=int, default=20, help="one-resource applies at the end")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the steady read")
    args = p.parse_args()

    apps = (args.resources + 3) // 4
    docs = [d for i in range(apps) for d in app_resources(i)][: args.resources]
    with tempfile.TemporaryDirectory(prefix="trellis-control-memory-") as data_dir:
        proc, base = start(args.binary, data_dir)
        try:
            sampler = Sampler(proc.pid)
            sampler.start()
            idle = status_kib(proc.pid)["VmRSS"]
            post(base, "/v1/apply", stream([
                {"apiVersion": API, "kind": "Mesh", "metadata": {"name": "bench"}}
            ]))
            started = time.monotonic()
            batch_times = []
            for at in range(0, len(docs), args.batch):
                t = time.monotonic()
                post(base, "/v1/apply", stream(docs[at : at + args.batch]))
                batch_times.append(time.monotonic() - t)
            total = time.monotonic() - started

            singles = []
            for n in range(args.singles):
                change = app_resources(n)[2]
                targets = change["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"]
                targets[0]["weight"], targets[1]["weight"] = 90 - (n % 2) * 10, 10 + (n % 2) * 10
                t = time.monotonic()
                post(base, "/v1/apply", stream([change]))
                singles.append(time.monotonic() - t)

            time.sleep(args.settle)
            applied = status_kib(proc.pid)
            listed = sum(
                len(get(base, f"/v1/resources/{kind}")["items"])
                for kind in ("Mesh", "VirtualNode", "VirtualRouter", "VirtualService")
            )
            if listed != len(docs) + 1:
                sys.exit(f"expected {len(docs) + 1} resources, the control plane lists {listed}")
            time.sleep(args.settle)
            final = status_kib(proc.pid)
            store_bytes = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data_dir) for f in fs
            )
            sampler.stop.set()
            sampler.join()
        finally:
            stop(proc)
        # A restart reads the whole store once: the view alone, without the applies' garbage.
        proc, base = start(args.binary, data_dir)
        try:
            get(base, "/healthz")
            time.sleep(args.settle)
            restarted = status_kib(proc.pid)
        finally:
            stop(proc)

    mib = lambda kib: f"{kib / 1024:.1f} MiB"
    print(f"resources:                 {len(docs)} (+1 Mesh), {args.batch} per apply")
    print(f"RSS idle:                  {mib(idle)}")
    print(f"RSS peak (VmHWM):          {mib(final['VmHWM'])}  (sampled: {mib(sampler.peak)})")
    print(f"RSS after the applies:     {mib(applied['VmRSS'])} (peak {mib(applied['VmHWM'])})")
    print(f"RSS steady (VmRSS):        {mib(final['VmRSS'])} (after listing every resource)")
    print(f"RSS after a restart:       {mib(restarted['VmRSS'])} (peak {mib(restarted['VmHWM'])})")
    print(f"store file:                {store_bytes / 1048576:.1f} MiB")
    print(f"apply all:                 {total:.2f} s "
          f"(batch median {statistics.median(batch_times) * 1000:.0f} ms, "
          f"last {batch_times[-1] * 1000:.0f} ms)")
    if singles:
        print(f"apply one at {len(docs)}:      median {statistics.median(singles) * 1000:.1f} ms, "
              f"max {max(singles) * 1000:.1f} ms ({len(singles)} applies)")


if __name__ == "__main__":
    main()
