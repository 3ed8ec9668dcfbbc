#!/usr/bin/env python3
# Stale metric series after reloads: a snapshot of N routes (one request each), reloaded 3 times
# with new route names; prints the request series lines in /metrics and the proxy's RSS after
# each. Usage: benches/stale_series.py PATH/TO/trellis-proxy [N]   (default N 1900)
import http.server, os, re, socket, subprocess, sys, tempfile, threading, time, urllib.request

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1900

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=up.serve_forever, daemon=True).start()

def snap(gen):
    routes = "".join(f"          - {{name: r{gen}-{i}, match: {{exact: /p{i}}}, action: {{weightedTargets: [{{cluster: c{gen}, weight: 1}}]}}}}\n" for i in range(N))
    return (f"version: v{gen}\nlisteners:\n  - name: egress\n    role: EGRESS\n    virtualHosts:\n      - name: h\n        domains: ['*']\n        routes:\n{routes}"
            f"clusters:\n  - name: c{gen}\n    endpoints: [{{address: '127.0.0.1:{up.server_address[1]}'}}]\n")

def free():
    # The proxy needs its ports on the command line; a port just freed by the OS is good enough
    # for a measurement (the test suite never does this).
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

d = tempfile.mkdtemp(); path = os.path.join(d, "s.yaml"); open(path, "w").write(snap(0))
eg, ad = free(), free()
p = subprocess.Popen([BIN, "--snapshot", path, "--ingress-addr", "127.0.0.1:0", "--egress-addr", f"127.0.0.1:{eg}",
                      "--admin-addr", f"127.0.0.1:{ad}", "--snapshot-poll", "100ms", "--log", "warn"])
def get(url):
    return urllib.request.urlopen(url, timeout=10).read().decode()
for _ in range(100):
    try: get(f"http://127.0.0.1:{ad}/ready"); break
    except Exception: time.sleep(0.1)
def rss(): return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{p.pid}/status").read()).group(1)) / 1024
def series():
    m = get(f"http://127.0.0.1:{ad}/metrics")
    return sum(1 for l in m.splitlines() if l.startswith("trellis_proxy_request"))
for gen in range(4):
    if gen:
        tmp = path + ".tmp"; open(tmp, "w").write(snap(gen)); os.rename(tmp, path)
        for _ in range(200):
            if f'"version": "v{gen}"' in get(f"http://127.0.0.1:{ad}/config_dump").replace('":"', '": "'): break
            time.sleep(0.05)
    for i in range(N):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{eg}/p{i}", headers={"host": "x"}), timeout=10).read()
    print(f"after snapshot {gen}: {series()} request series lines, RSS {rss():.1f} MiB", flush=True)
p.terminate(); p.wait()
