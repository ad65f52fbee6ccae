"""A fake Hugging Face Hub on 127.0.0.1, for testing uploads and downloads with the real client.

It implements the HTTP endpoints ``huggingface_hub`` calls for ``create_repo``, ``create_branch``,
``repo_info``/``model_info``, ``upload_folder`` (YAML validation, preupload, the git-LFS batch API
with upload and verify, the ndjson commit) and ``snapshot_download`` (revision info, tree listing,
``resolve`` with HEAD and GET), and nothing else (Xet storage answers 404, as a Hub without Xet
does). It is honest: every request with a token must carry a valid one (else 401, as the Hub
answers), writes need write access to the namespace, private repos need a token, gated repos refuse
downloads to users not granted access, uploaded LFS objects are checked against their sha256, and
what a commit stores is what later downloads serve. Every request is recorded (``server.log``).

``FakeHub(lifetime=...)`` serves from a daemon thread and stops itself after `lifetime` seconds at
most, so a forgotten server cannot outlive a test session.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_THRESHOLD = 10_000  # bytes: larger files (and every .safetensors) go through LFS
REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    granted: set = field(default_factory=set)  # users allowed to download a gated repo
    branches: dict = field(default_factory=dict)  # name -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> {path: (bytes, lfs: bool)}


class State:
    """Users, tokens, repos, LFS objects, and the log of requests."""

    def __init__(self, users: dict[str, str], orgs: dict[str, set]):
        self.tokens = dict(users)  # token -> user
        self.orgs = orgs  # org -> members
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[dict] = []
        self.disabled: set[str] = set()  # endpoints (handler names) this Hub does not have
        self.lock = threading.RLock()
        self.counter = 0

    def new_sha(self, *parts: object) -> str:
        self.counter += 1
        return hashlib.sha1(f"{self.counter}|{parts}".encode()).hexdigest()

    def can_write(self, user: str | None, repo_id: str) -> bool:
        ns = repo_id.split("/")[0]
        return user is not None and (ns == user or user in self.orgs.get(ns, set()))

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False,
                 gated: bool = False) -> str:
        """Create a repo holding `files` on main (for download tests); returns the commit sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private, gated=gated))
            tree = {".gitattributes": (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)}
            for path, data in (files or {}).items():
                lfs = len(data) > LFS_THRESHOLD or path.endswith(".safetensors")
                tree[path] = (data, lfs)
                if lfs:
                    self.lfs[hashlib.sha256(data).hexdigest()] = data
            sha = self.new_sha(repo_id, "init")
            repo.commits[sha] = tree
            repo.branches["main"] = sha
            return sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo.branches.get(rev, rev)
        return {p: d for p, (d, _) in repo.commits[sha].items()}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    state: State

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _user(self, required: bool = False) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _send(self, status: int, payload: object = None, headers: dict | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        with self.state.lock:
            self.state.log.append({"method": method, "path": url.path, "headers": dict(self.headers),
                                   "body": body})
        try:
            for verb, pattern, fn in ROUTES:
                m = re.fullmatch(pattern, url.path)
                if verb == method and m and fn.__name__ not in self.state.disabled:
                    groups = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    return fn(self, groups, body, parse_qs(url.query))
            raise HubError(404, f"no route {method} {url.path}")
        except (KeyError, ValueError, TypeError) as exc:  # a malformed request (or a bug here): say so
            self._send(400, {"error": f"bad request: {type(exc).__name__}: {exc}"}, head=method == "HEAD")
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- repos ----------------------------------------------------------------------------------
    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self.state.can_write(user, repo_id)):
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and not self.state.can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str:
        sha = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def create_repo(self, g, body, q):
        user = self._user(required=True)
        req = json.loads(body)
        repo_id = f"{req.get('organization') or user}/{req['name']}"
        url = f"{self.base}/{repo_id}"
        if not self.state.can_write(user, repo_id):
            raise HubError(403, "You don't have the rights to create a model under the namespace "
                           f"{repo_id.split('/')[0]}")
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self.state.add_repo(repo_id, private=req.get("visibility") == "private" or bool(req.get("private")))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, g, body, q):
        repo = self._repo(g["repo"], write=True)
        if g["branch"] in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{g['branch']}")
        start = (json.loads(body or b"{}")).get("startingPoint") or "main"
        repo.branches[g["branch"]] = self._commit(repo, start)
        self._send(200, {})

    def revision(self, g, body, q):
        repo = self._repo(g["repo"])
        sha = self._commit(repo, g.get("rev") or "main")
        files = repo.commits[sha]
        self._send(200, {"id": g["repo"], "modelId": g["repo"], "sha": sha, "private": repo.private,
                         "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def tree(self, g, body, q):
        repo = self._repo(g["repo"])
        sha = self._commit(repo, g["rev"])
        prefix = (g.get("path") or "").strip("/")
        out = []
        for path, (data, lfs) in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        self._send(200, out)

    def resolve(self, g, body, q, head: bool = False):
        repo = self._repo(g["repo"])
        user = self._user()
        if repo.gated and user not in repo.granted:
            raise HubError(403 if user else 401, f"Access to model {g['repo']} is restricted. You must have access "
                           "to it and be authenticated to access it. Please log in.", "GatedRepo")
        sha = self._commit(repo, g["rev"])
        found = repo.commits[sha].get(g["path"])
        if found is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data, lfs = found
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if rng and not head:
            return self._send(206, headers=headers, raw=data[int(rng.group(1)):])
        self._send(200, headers=headers, raw=data, head=head)

    def resolve_head(self, g, body, q):
        return self.resolve(g, body, q, head=True)

    # -- uploads --------------------------------------------------------------------------------
    def validate_yaml(self, g, body, q):
        content = json.loads(body).get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content[3:content.find("\n---", 3)])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, g, body, q):
        repo = self._repo(g["repo"], write=True)
        current = repo.commits[self._commit(repo, g["rev"])]
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["size"] > LFS_THRESHOLD or f["path"].endswith(".safetensors")
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if f["path"] in current:
                data, was_lfs = current[f["path"]]
                entry["oid"] = hashlib.sha256(data).hexdigest() if was_lfs else git_blob_sha1(data)
            files.append(entry)
        self._send(200, {"files": files, "commitOid": repo.branches.get(g["rev"])})

    def lfs_batch(self, g, body, q):
        self._repo(g["repo"], write=True)
        req = json.loads(body)
        objects = []
        for o in req["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.state.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.base}/{g['repo']}.git/info/lfs/objects/verify", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, g, body, q):
        if hashlib.sha256(body).hexdigest() != g["oid"]:
            raise HubError(400, "sha256 of the uploaded content does not match the object id")
        self.state.lfs[g["oid"]] = body
        self._send(200, {})

    def lfs_verify(self, g, body, q):
        self._repo(g["repo"], write=True)
        req = json.loads(body)
        if len(self.state.lfs.get(req["oid"], b"")) != req["size"] or req["oid"] not in self.state.lfs:
            raise HubError(404, "object not found")
        self._send(200, {})

    def commit(self, g, body, q):
        repo = self._repo(g["repo"], write=True)
        parent = self._commit(repo, g["rev"])
        tree = dict(repo.commits[parent])
        header = None
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                tree[value["path"]] = (base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.state.lfs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                tree[value["path"]] = (data, True)
            elif key in ("deletedFile", "deletedFolder"):
                gone = value["path"].rstrip("/")
                tree = {p: v for p, v in tree.items() if p != gone and not p.startswith(gone + "/")}
        if header is None or not header.get("summary"):
            raise HubError(400, "a commit needs a header with a summary")
        sha = self.state.new_sha(g["repo"], header["summary"])
        repo.commits[sha] = tree
        repo.branches[g["rev"]] = sha
        self._send(200, {"commitUrl": f"{self.base}/{g['repo']}/commit/{sha}", "commitOid": sha,
                         "commitMessage": header["summary"], "pullRequestUrl": None})

    def whoami(self, g, body, q):
        user = self._user(required=True)
        self._send(200, {"name": user, "type": "user",
                         "orgs": [{"name": o} for o, members in self.state.orgs.items() if user in members]})

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


API = rf"/api/models/{REPO}"
ROUTES = [
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("GET", r"/api/whoami-v2", Handler.whoami),
    ("POST", rf"{API}/branch/(?P<branch>.+)", Handler.create_branch),
    ("GET", rf"{API}/revision/(?P<rev>[^/]+)", Handler.revision),
    ("GET", rf"{API}", Handler.revision),
    ("GET", rf"{API}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", Handler.tree),
    ("POST", rf"{API}/preupload/(?P<rev>[^/]+)", Handler.preupload),
    ("POST", rf"{API}/commit/(?P<rev>[^/]+)", Handler.commit),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", Handler.lfs_verify),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve_head),
]


class FakeHub:
    """``with FakeHub({"hf_good": "alice"}) as hub: hub.url ...``; stops itself after `lifetime` s."""

    def __init__(self, users: dict[str, str], orgs: dict[str, set] | None = None, lifetime: float = 600):
        self.state = State(users, orgs or {})
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self.thread.start()
        self.timer.start()
        return self

    def close(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
