#!/usr/bin/env python3
"""Kubernetes API server stand-in for Trellis tests.

A small test fixture, NOT a Kubernetes implementation: an untyped JSON object
store speaking just enough of the apiserver's HTTP protocol (list, watch with
resume and 410 Expired, get, create, replace, merge/json patch, delete with
finalizers, /status) for trellis-control's Kubernetes source (kube-rs and
`kube::runtime::watcher` over plain HTTP).  No schema, validation, admission,
auth or pagination.  Test-only endpoints: POST /standin/compact (drop watch
history and end all watches), GET /standin/requests (recent non-GET
requests), GET /standin/watches ({"open": N}), POST /standin/tokens (a token
TokenReviews at /apis/authentication.k8s.io/v1/tokenreviews then accept).

Usage: python3 testkit/kube-standin.py [--port 0] [--history N] [--verbose]
prints `listening http://127.0.0.1:PORT`, then serves until killed.
"""
import argparse, collections, copy, json, random, select, socket, string, sys
import threading, time, traceback, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json",
               "application/apply-patch+yaml")
JSON_PATCH = "application/json-patch+json"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def status_body(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "code": code, "message": message}


class ApiError(Exception):
    def __init__(self, code, reason, message):
        super().__init__(message)
        self.code, self.body = code, status_body(code, reason, message)


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (null deletes, objects merge, anything else replaces)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc, ops):
    """RFC 6902 JSON patch: add, replace, remove, test."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    root = {"": copy.deepcopy(doc)}  # so that the whole document ("") has a parent
    for op in ops:
        try:
            kind, path = op["op"], op["path"]
            if kind not in ("add", "remove", "replace", "test") or path[:1] not in ("", "/"):
                raise ValueError("unsupported op or bad path")
            parts = [""] + [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
            parent = root
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            key = parts[-1]
            if isinstance(parent, list):
                key = len(parent) if key == "-" else int(key)
                if key > len(parent):
                    raise IndexError(key)
            if kind == "test" and parent[key] != op["value"]:
                raise ValueError("test failed")
            if kind in ("remove", "replace"):
                del parent[key]  # must exist
            if kind in ("add", "replace"):
                if isinstance(parent, list):
                    parent.insert(key, copy.deepcopy(op["value"]))
                else:
                    parent[key] = copy.deepcopy(op["value"])
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise ApiError(422, "Invalid", f"json patch {op!r} failed: {err!r}")
    return root[""]


def parse_selector(text):
    """Requirements from `k=v`, `k==v`, `k!=v`, `k`, `!k` comma-separated terms."""
    reqs = []
    for term in (text or "").split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            reqs.append((k.strip(), "!=", v.strip()))
        elif "=" in term:
            k, v = term.split("=", 1)
            reqs.append((k.strip(), "=", v.lstrip("=").strip()))
        elif term.startswith("!"):
            reqs.append((term[1:].strip(), "!", None))
        else:
            reqs.append((term, "exists", None))
    return reqs


def field_value(obj, dotted):
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return None if obj is None else str(obj)


def selected(obj, labels, fields):
    have = (obj.get("metadata") or {}).get("labels") or {}
    for k, op, v in labels:
        if (op == "=" and have.get(k) != v) or (op == "!=" and have.get(k) == v) \
                or (op == "exists" and k not in have) or (op == "!" and k in have):
            return False
    for k, op, v in fields:
        got = field_value(obj, k) or ""
        if (op == "=" and got != v) or (op == "!=" and got == v):
            return False
    return True


Ref = collections.namedtuple("Ref", "group version ns plural name sub")


def parse_path(path):
    """Map an API path to a Ref (plural None = group-version root), or None."""
    segs = [s for s in path.split("/") if s]
    if len(segs) >= 2 and segs[0] == "api":
        group, version, rest = "", segs[1], segs[2:]
    elif len(segs) >= 3 and segs[0] == "apis":
        group, version, rest = segs[1], segs[2], segs[3:]
    else:
        return None
    ns = None
    # /namespaces/X/status is the Namespace X's status, /namespaces/X/pods a collection.
    if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] == "status"):
        ns, rest = rest[1], rest[2:]
    if len(rest) > 3:
        return None
    rest = rest + [None] * (3 - len(rest))
    return Ref(group, version, ns, rest[0], rest[1], rest[2])


class Store:
    def __init__(self, history):
        self.cond = threading.Condition()
        self.objects = {}  # (group, version, plural, ns-or-"", name) -> object
        self.kinds = {}    # (group, version, plural) -> last seen kind
        self.rv = 0
        self.history = collections.deque(maxlen=history)
        self.epoch = 0     # bumped by /standin/compact to end every watch
        self.tokens = {}   # token -> what TokenReviews answer (POST /standin/tokens)
        self.open_watches = 0
        self.requests = collections.deque(maxlen=1000)

    @staticmethod
    def key(ref, name=None):
        return (ref.group, ref.version, ref.plural, ref.ns or "", name or ref.name)

    @staticmethod
    def api_version(ref):
        return f"{ref.group}/{ref.version}" if ref.group else ref.version

    def oldest_resumable(self):
        return (self.history[0][0] if self.history else self.rv + 1) - 1

    def _write(self, key, etype, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if etype == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        if obj.get("kind"):
            self.kinds[key[:3]] = obj["kind"]
        self.history.append((self.rv, key, etype, copy.deepcopy(obj)))
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def _get(self, ref):
        obj = self.objects.get(self.key(ref))
        if obj is None:
            raise ApiError(404, "NotFound", f'{ref.plural} "{ref.name}" not found')
        return obj

    def get(self, ref):
        with self.cond:
            return copy.deepcopy(self._get(ref))

    def list(self, ref, labels, fields):
        with self.cond:
            items = [copy.deepcopy(o) for k, o in sorted(self.objects.items())
                     if k[:3] == self.key(ref)[:3] and (ref.ns is None or k[3] == ref.ns)
                     and selected(o, labels, fields)]
            kind = self.kinds.get(self.key(ref)[:3])
            return {"apiVersion": self.api_version(ref), "kind": f"{kind}List" if kind else "List",
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def create(self, ref, body):
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choices(string.ascii_lowercase + string.digits, k=5))
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
        with self.cond:
            key = self.key(ref, meta["name"])
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{ref.plural} "{meta["name"]}" already exists')
            body.setdefault("apiVersion", self.api_version(ref))
            for field in ("resourceVersion", "deletionTimestamp", "namespace"):
                meta.pop(field, None)
            if ref.ns:
                meta["namespace"] = ref.ns
            meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=now())
            return self._write(key, "ADDED", body)

    def _commit(self, ref, cur, new):
        """Store `new` in place of `cur`, keeping server-owned metadata."""
        if not isinstance(new, dict) or not isinstance(new.setdefault("metadata", {}), dict):
            raise ApiError(422, "Invalid", "object and metadata must be JSON objects")
        meta, old = new["metadata"], cur["metadata"]
        if meta.get("resourceVersion") not in (None, old["resourceVersion"]):
            raise ApiError(409, "Conflict", f'{ref.plural} "{ref.name}": the object has been modified')
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"):
            meta.pop(field, None)
            if field in old:
                meta[field] = old[field]
        meta["resourceVersion"] = old["resourceVersion"]
        new.update({k: cur[k] for k in ("apiVersion", "kind") if k in cur and k not in new})
        meta["generation"] = old.get("generation", 1) + (new.get("spec") != cur.get("spec"))
        key = self.key(ref)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._write(key, "DELETED", new)
        if new == cur:  # no-op writes do not bump resourceVersion (as in the real apiserver)
            return copy.deepcopy(cur)
        return self._write(key, "MODIFIED", new)

    def _restrict(self, ref, cur, new):
        """Apply the status-subresource rules to a candidate object."""
        if ref.sub == "status":  # only .status may change
            out, new = copy.deepcopy(cur), new if isinstance(new, dict) else {}
            out.pop("status", None)
            if "status" in new:
                out["status"] = new["status"]
            if isinstance(new.get("metadata"), dict):  # keep the client's precondition
                out["metadata"]["resourceVersion"] = new["metadata"].get("resourceVersion")
            return out
        if ref.group and isinstance(new, dict):  # non-core kinds: status only via /status
            new.pop("status", None)
            if "status" in cur:
                new["status"] = copy.deepcopy(cur["status"])
        return new

    def replace(self, ref, body):
        with self.cond:
            cur = self._get(ref)
            return self._commit(ref, cur, self._restrict(ref, cur, body))

    def patch(self, ref, ctype, body):
        with self.cond:
            cur = self.objects.get(self.key(ref))
            if cur is None and ctype == "application/apply-patch+yaml" and ref.sub is None \
                    and isinstance(body, dict):  # server-side apply creates
                body.setdefault("metadata", {})["name"] = ref.name
                return self.create(ref, body), 201
            cur = self._get(ref)
            if ctype == JSON_PATCH:
                new = json_patch(cur, body)
            elif ctype in MERGE_TYPES:
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                new = merge_patch(copy.deepcopy(cur), body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
            return self._commit(ref, cur, self._restrict(ref, cur, new)), 200

    def delete(self, ref):
        with self.cond:
            cur = self._get(ref)
            if not cur["metadata"].get("finalizers"):
                return self._write(self.key(ref), "DELETED", copy.deepcopy(cur))
            if cur["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(cur)
            new = copy.deepcopy(cur)
            new["metadata"]["deletionTimestamp"] = now()
            return self._write(self.key(ref), "MODIFIED", new)

    def compact(self):
        with self.cond:
            self.history.clear()
            self.epoch += 1
            self.cond.notify_all()

    def bookmark(self, ref, rv, annotations=None):
        meta = dict({"resourceVersion": str(rv)}, **({"annotations": annotations} if annotations else {}))
        return {"type": "BOOKMARK", "object": {"kind": self.kinds.get(self.key(ref)[:3], ""),
                                               "apiVersion": self.api_version(ref), "metadata": meta}}

    def next_events(self, watch, wait):
        """Events for `watch` after its cursor, waiting up to `wait` s. None = end the stream."""
        with self.cond:
            for attempt in (0, 1):
                if self.epoch != watch["epoch"]:
                    return None
                if watch["cursor"] < self.oldest_resumable():
                    watch["epoch"] = None  # send the error, then end
                    return [{"type": "ERROR", "object": status_body(
                        410, "Expired", "too old resource version")}]
                events = []
                for rv, key, etype, obj in reversed(self.history):
                    if rv <= watch["cursor"]:
                        break
                    if key[:3] == self.key(watch["ref"])[:3] and watch["ref"].ns in (None, key[3]) \
                            and selected(obj, watch["labels"], watch["fields"]):
                        events.append({"type": etype, "object": copy.deepcopy(obj)})
                watch["cursor"] = self.rv
                if events or attempt or wait <= 0:
                    return events[::-1]
                self.cond.wait(wait)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-standin/1"
    error_content_type = "application/json"  # for http.server's own errors (bad request line)
    error_message_format = ('{"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": '
                            '"Failure", "reason": "BadRequest", "code": %(code)d, "message": "%(message)s"}')

    def __getattr__(self, name):  # any other method -> 405 instead of http.server's 501
        if name.startswith("do_"):
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    def setup(self):
        super().setup()  # headers and body go out in separate writes: avoid Nagle stalls
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def send_json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def dispatch(self, method):
        self.streaming = False
        try:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            raw, body, bad = self.rfile.read(int(self.headers.get("Content-Length") or 0)), None, None
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as err:
                    bad = f"malformed JSON body: {err}"
            if method != "GET":
                with self.server.store.cond:
                    self.server.store.requests.append({
                        "method": method, "path": url.path, "query": url.query, "body": body,
                        "contentType": self.headers.get("Content-Type"),
                        "userAgent": self.headers.get("User-Agent")})
            if bad:
                raise ApiError(400, "BadRequest", bad)
            self.route(method, url.path, query, body)
        except ApiError as err:
            if err.code == 405:
                self.close_connection = True
            self.send_json(err.code, err.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # never let bad input kill the server
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self.streaming:
                self.send_json(500, status_body(500, "InternalError", repr(err)))

    def route(self, method, path, query, body):
        store = self.server.store
        fixed = {("POST", "/standin/compact"): lambda: store.compact() or {},
                 ("GET", "/standin/requests"): lambda: list(store.requests),
                 ("GET", "/standin/watches"): lambda: {"open": store.open_watches},
                 ("GET", "/version"): lambda: {"major": "1", "minor": "33", "gitVersion": "v1.33.0"},
                 ("GET", "/api"): lambda: {"kind": "APIVersions", "versions": ["v1"]},
                 ("GET", "/apis"): lambda: {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}}
        if method == "POST" and path.rstrip("/") == "/standin/tokens":
            # Registers a token TokenReviews accept: {"token": ..., "user": {...}, "audiences": [...]}.
            with store.cond:
                store.tokens[body["token"]] = body
            return self.send_json(200, {})
        if method == "POST" and path.rstrip("/") == "/apis/authentication.k8s.io/v1/tokenreviews":
            # What an API server's authenticator answers: the user a token names, for the
            # audiences asked for; an unknown token (or another audience) is not authenticated.
            spec = (body or {}).get("spec") or {}
            with store.cond:
                known = store.tokens.get(spec.get("token"))
            wanted = spec.get("audiences") or []
            have = known.get("audiences") or [] if known else []
            if known and (not wanted or set(wanted) & set(have)):
                status = {"authenticated": True, "user": known["user"],
                          "audiences": [a for a in have if not wanted or a in wanted]}
            else:
                status = {"authenticated": False, "error": "invalid bearer token"}
            return self.send_json(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                        "metadata": {"creationTimestamp": None}, "spec": spec, "status": status})
        if (method, path.rstrip("/")) in fixed:
            with store.cond:
                return self.send_json(200, fixed[(method, path.rstrip("/"))]())
        ref = parse_path(path)
        if ref is not None and ref.group in self.server.unserved:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        if ref is None or ref.sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        allowed = {"GET"} if ref.plural is None else {"GET", "POST"} if ref.name is None \
            else {"GET", "PUT", "PATCH"} if ref.sub else {"GET", "PUT", "PATCH", "DELETE"}
        if method not in allowed:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
        if method in ("POST", "PUT") and not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        if method == "PATCH" and body is None:
            raise ApiError(400, "BadRequest", "the patch body is empty")
        labels = parse_selector(query.get("labelSelector"))
        fields = parse_selector(query.get("fieldSelector"))
        if ref.plural is None:
            self.send_json(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                 "groupVersion": store.api_version(ref), "resources": []})
        elif ref.name is None and method == "GET":
            if query.get("watch") in ("1", "true"):
                self.watch(ref, query, labels, fields)
            else:
                self.send_json(200, store.list(ref, labels, fields))
        elif method == "POST":
            self.send_json(201, store.create(ref, body))
        elif method == "GET":
            self.send_json(200, store.get(ref))
        elif method == "PUT":
            self.send_json(200, store.replace(ref, body))
        elif method == "PATCH":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            obj, code = store.patch(ref, ctype, body)
            self.send_json(code, obj)
        else:
            self.send_json(200, store.delete(ref))

    def peer_closed(self):
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def watch(self, ref, query, labels, fields):
        store = self.server.store
        try:
            since = int(query.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 300)
        except ValueError:
            raise ApiError(400, "BadRequest", "invalid resourceVersion or timeoutSeconds")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.streaming = True
        pending = []
        with store.cond:
            store.open_watches += 1
            watch = {"ref": ref, "labels": labels, "fields": fields, "epoch": store.epoch,
                     "cursor": since if since else store.rv}
            if query.get("sendInitialEvents") == "true":  # streaming-list mode
                items = store.list(ref, labels, fields)["items"]
                items.sort(key=lambda o: int(o["metadata"]["resourceVersion"]))
                pending = [{"type": "ADDED", "object": o} for o in items]
                watch["cursor"] = store.rv
                pending.append(store.bookmark(ref, store.rv, {INITIAL_EVENTS_END: "true"}))
        try:
            last_sent = time.monotonic()
            while True:
                for event in pending:
                    data = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    last_sent = time.monotonic()
                if watch["epoch"] is None or self.peer_closed():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pending = store.next_events(watch, min(remaining, 1.0))
                if pending is None:
                    break
                if not pending and bookmarks and time.monotonic() - last_sent >= 1.0:
                    pending = [store.bookmark(ref, watch["cursor"])]  # all <= cursor delivered
            self.wfile.write(b"0\r\n\r\n")
        finally:
            with store.cond:
                store.open_watches -= 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = ephemeral)")
    parser.add_argument("--history", type=int, default=10000, help="watch events retained")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--unserved", action="append", default=[],
                        help="an API group served as absent (404), as when its CRDs are not installed")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.store = Store(args.history)
    server.verbose = args.verbose
    server.unserved = set(args.unserved)
    print(f"listening http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
