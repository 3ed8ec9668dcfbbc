#!/usr/bin/env bash
# Instructions per request of trellis-proxy, counted by callgrind: repeatable on a noisy machine,
# unlike timings. Runs the proxy with the side-by-side benchmark's snapshot under valgrind, warms
# it up, zeroes the counters, sends N requests and prints the proxy's user-space instructions per
# request: HTTP/1.1 keep-alive (`h2load --h1 -c10`), or with `h2c` prior-knowledge HTTP/2
# (`h2load -c8 -m16`, as in the side-by-side benchmark).
#
#   benches/callgrind.sh [N] [h1|h2c]     (default 20000 h1)
#   KEEP_CALLGRIND=FILE keeps the callgrind profile for callgrind_annotate.
#   FEATURE=headers puts issue 15's feature (a name of proxy_bench.py's FEATURES or
#   CLUSTER_FEATURES) on the route or cluster the requests take (the cost of it configured);
#   unset, they have none (the cost of it not configured).
#   BIN=DIR runs DIR/trellis-proxy (e.g. a build of an earlier commit) instead of building.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
case "${2:-h1}" in
  h1) load=(--h1 -c 10) ;;
  h2c) load=(-c 8 -m 16) ;;
  *) echo "usage: $0 [N] [h1|h2c]" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo; $sudo_ apt-get install -y -qq valgrind; }
command -v h2load >/dev/null || { sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo; $sudo_ apt-get install -y -qq nghttp2-client; }
# The proxy is built on its own: built with the benches (which use trellis-control), it would
# take the features the control plane's dependencies turn on (kube-client's tracing/log).
cargo build --profile dist -q -p trellis-benches --bin bench-upstream
bin="${CARGO_TARGET_DIR:-target}/dist"
proxy_bin="${BIN:-$bin}/trellis-proxy"
[ -n "${BIN:-}" ] || cargo build --profile dist -q -p trellis-proxy --bin trellis-proxy
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT 2>/dev/null
[ -n "${KEEP_CALLGRIND:-}" ] && keep() { cp "$(ls -t "$work"/cg.out* | head -1)" "$KEEP_CALLGRIND"; } || keep() { :; }

"$bin/bench-upstream" 127.0.0.1:0 > "$work/upstream" & pids+=($!)
for _ in $(seq 100); do [ -s "$work/upstream" ] && break; sleep 0.05; done
upstream=$(head -1 "$work/upstream")
python3 - "$upstream" "${FEATURE:-}" > "$work/snapshot.yaml" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pb", "benches/proxy_bench.py")
pb = importlib.util.module_from_spec(spec); spec.loader.exec_module(pb)
print(pb.trellis_snapshot(sys.argv[1], sys.argv[2]))
PY
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" -q \
  "$proxy_bin" --snapshot "$work/snapshot.yaml" --workers 1 --log error \
  --egress-addr "127.0.0.1:$port" --ingress-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 & pids+=($!)
proxy=$!
for _ in $(seq 600); do
  curl -fs -o /dev/null -H "Host: bench.local" "http://127.0.0.1:$port/" && break
  sleep 0.1
done
h2load "${load[@]}" -n 2000 -H ":authority: bench.local" "http://127.0.0.1:$port/" > /dev/null
callgrind_control --zero "$proxy" > /dev/null
h2load "${load[@]}" -n "$N" -H ":authority: bench.local" "http://127.0.0.1:$port/" | grep -E "^requests:"
callgrind_control --dump "$proxy" > /dev/null
sleep 1
dump=$(ls -t "$work"/cg.out* | head -1)
total=$(callgrind_annotate "$dump" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
keep
echo "instructions per request: $((total / N)) (total $total over $N requests)"
