#!/usr/bin/env bash
# Quickstart: trellis-proxy in front of two sample upstreams (python3 http.server for v1 and v2),
# sending 200 requests through the egress with a 90/10 split, then showing the split, the
# metrics and the config in use. Cleans up everything it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p trellis-proxy
bin="${CARGO_TARGET_DIR:-target}/release/trellis-proxy"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/v1" "$work/v2"
echo "hello from v1" > "$work/v1/index.html"
echo "hello from v2" > "$work/v2/index.html"
python3 -m http.server 18081 --bind 127.0.0.1 --directory "$work/v1" >/dev/null 2>&1 & pids+=($!)
python3 -m http.server 18082 --bind 127.0.0.1 --directory "$work/v2" >/dev/null 2>&1 & pids+=($!)
"$bin" --snapshot examples/quickstart/snapshot.yaml \
  --ingress-addr 127.0.0.1:15000 --egress-addr 127.0.0.1:15001 --admin-addr 127.0.0.1:9901 \
  --access-log "$work/access.log" & pids+=($!)

for _ in $(seq 100); do
  curl -fs http://127.0.0.1:9901/ready >/dev/null 2>&1 && curl -fs -o /dev/null http://127.0.0.1:18082/ 2>/dev/null && break
  sleep 0.1
done
echo
echo "== 200 requests to hello.local:8080 through the egress (http_proxy style) =="
for _ in $(seq 200); do
  curl -s -x http://127.0.0.1:15001 http://hello.local:8080/
done | sort | uniq -c
echo
echo "== the same service through the ingress (to the local app) =="
curl -s http://127.0.0.1:15000/
echo
echo "== a few metrics (http://127.0.0.1:9901/metrics) =="
curl -s http://127.0.0.1:9901/metrics | grep -E '^trellis_proxy_(requests_total|snapshot_info)'
echo
echo "== last access log line =="
tail -n 1 "$work/access.log"
echo
echo "Done. Edit examples/quickstart/snapshot.yaml and send SIGHUP (or just save it) to reload."
