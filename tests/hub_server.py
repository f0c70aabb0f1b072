"""A small Hub on 127.0.0.1: the part of the Hugging Face Hub HTTP API that `huggingface_hub` and
`datasets` call to create a repository, commit files (regular and LFS), list and download them.

No maintained local Hub on the package index does this offline: `hf-local-hub` wraps a Go binary
that its wheel does not ship, and `olah` is a read-through mirror of the real Hub. So this is the
standard library only: `http.server` in a thread. Repositories live in memory as commits (a dict
path -> bytes each) and refs (branch -> commit). Point the real clients at it with
HF_ENDPOINT=server.url, HF_TOKEN=a token of `server.tokens`, HF_HUB_DISABLE_XET=1 (uploads take
the LFS batch path: Xet storage needs a content-addressed store this server does not have).

Faults for the error tests: `server.die_on = "lfs" | "commit"` drops that request's connection and
stops the server, as a Hub that goes away mid-upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# As the Hub's default .gitattributes: these are stored with LFS (pointer in git, content aside).
LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".arrow", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".zip", ".gz")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # one part of a repo id


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(path: str, content: bytes = b"") -> bool:
    return path.endswith(LFS_SUFFIXES) or len(content) > 10_000_000


@dataclass
class Repo:
    owner: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch (e.g. main, refs/convert/parquet) -> sha

    def commit(self, branch: str, files: dict[str, bytes], deleted: tuple[str, ...] = ()) -> str:
        tree = dict(self.commits.get(self.refs.get(branch, ""), {}))
        for path in deleted:
            for p in [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]:
                del tree[p]
        tree.update(files)
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]  # 40 hex digits, like a git commit id
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class LocalHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.tokens = tokens  # token -> user name
        self.orgs = orgs or {}  # user name -> the organisations they belong to
        self.repos: dict[tuple[str, str], Repo] = {}  # (type: model | dataset, repo id) -> Repo
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.log: list[str] = []  # "METHOD path status", without headers (no token in it)
        self.die_on: str | None = None
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def add_repo(self, repo_type: str, repo_id: str, owner: str | None = None) -> Repo:
        repo = self.repos.setdefault((repo_type, repo_id), Repo(owner or repo_id.split("/")[0]))
        if "main" not in repo.refs:
            repo.commit("main", {".gitattributes": GITATTRIBUTES})
        return repo

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.resolve(revision)]

    def entry(self, path: str, content: bytes) -> dict:
        info = {"type": "file", "path": path, "size": len(content), "oid": git_oid(content)}
        if is_lfs(path, content):
            info["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return info


class Handler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the server keeps its own log (self.server.log), with no header in it

    # ---- plumbing

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.parts = [unquote(p) for p in url.path.strip("/").split("/")]  # %2F inside a part stays in it
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        status = 200
        try:
            self.user = self._user()
            status, headers, body = self._dispatch(method)
        except HubError as e:
            status, body = e.status, json.dumps({"error": e.message, **e.body}).encode()
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
        except ConnectionAbortedError:  # see _die: no answer at all
            status = "dropped"
            return
        finally:
            self.server.log.append(f"{method} {url.path} {status}")
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_HEAD = lambda self: self._route("HEAD")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731
    do_PUT = lambda self: self._route("PUT")  # noqa: E731

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        user = self.server.tokens.get(auth.removeprefix("Bearer "))
        if user is None:  # the Hub's words, which huggingface_hub tells apart from "repo not found"
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _die(self) -> None:
        """Drop this connection unanswered and stop listening: the Hub went away mid-request."""
        threading.Thread(target=self.server.stop, daemon=True).start()
        self.close_connection = True
        self.connection.close()
        raise ConnectionAbortedError

    def _json(self, obj):
        return 200, {}, json.dumps(obj).encode()

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo = self.server.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and self.user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if write and self.user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _revision(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # ---- routes

    def _dispatch(self, method: str):
        p = self.parts
        if p[:2] == ["api", "whoami-v2"]:
            if self.user is None:
                raise HubError(401, "Invalid username or password.")
            orgs = [{"type": "org", "name": org} for org in self.server.orgs.get(self.user, [])]
            return self._json(
                {
                    "type": "user",
                    "name": self.user,
                    "orgs": orgs,
                    "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                }
            )
        if p[:2] == ["api", "validate-yaml"] and method == "POST":  # a card's metadata block, before a push
            content = json.loads(self.body)["content"]
            if content.startswith("---") and "\n---" not in content[3:]:
                raise HubError(400, "the card's metadata block is not closed by ---")
            return self._json({"errors": [], "warnings": []})
        if p[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(self.body))
        if p[0] == "api" and len(p) >= 4 and p[1] in ("models", "datasets"):
            return self._api(method, p[1][:-1], f"{p[2]}/{p[3]}", p[4:])
        if len(p) >= 3 and p[0] == "lfs-upload" and method == "PUT":
            return self._lfs_put(p[1], p[2])
        repo_type, rest = ("dataset", p[1:]) if p[0] == "datasets" else ("model", p)
        if len(rest) >= 5 and rest[2] == "resolve":
            return self._resolve(method, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{rest[0]}/{rest[1][:-4]}")
        raise HubError(404, f"no route for {method} {self.path}")

    def _create_repo(self, payload: dict):
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        owner, name = payload.get("organization") or self.user, payload["name"]
        repo_type = payload.get("type") or "model"
        if not (NAME.match(owner) and NAME.match(name)):
            raise HubError(400, f"invalid repository name {owner}/{name}")
        repo_id = f"{owner}/{name}"
        url = f"{self.server.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        if (repo_type, repo_id) in self.server.repos:  # the Hub names the repository in its answer
            raise HubError(
                409, "You already created this repo" if owner == self.user else "Repository already exists", url=url
            )
        if owner != self.user and owner not in self.server.orgs.get(self.user, []):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {owner}")
        self.server.add_repo(repo_type, repo_id)
        return self._json({"url": url, "name": repo_id})

    def _api(self, method: str, repo_type: str, repo_id: str, rest: list[str]):
        if not rest or rest[0] == "revision":  # repo info
            repo = self._repo(repo_type, repo_id)
            sha = self._revision(repo, rest[1] if rest else "main")
            siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
            return self._json(
                {
                    "id": repo_id,
                    "sha": sha,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "siblings": siblings,
                    "tags": [],
                }
            )
        action, revision, path = rest[0], rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])
        if action == "preupload":
            repo = self._repo(repo_type, repo_id, write=True)
            self._revision(repo, revision)
            files = json.loads(self.body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if is_lfs(f["path"]) or f["size"] > 10_000_000 else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return self._json({"files": modes})
        if action == "commit":
            if self.server.die_on == "commit":
                self._die()
            return self._commit(self._repo(repo_type, repo_id, write=True), repo_type, repo_id, revision)
        repo = self._repo(repo_type, repo_id)
        tree = repo.commits[self._revision(repo, revision)]
        if action == "tree":
            recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(self._listing(tree, path, recursive))
        if action == "paths-info":
            wanted = parse_qs(self.body.decode())["paths"]
            return self._json([e for e in self._listing(tree, "", True) if e["path"] in wanted])
        raise HubError(404, f"no route for {method} {self.path}")

    def _listing(self, tree: dict[str, bytes], path: str, recursive: bool) -> list[dict]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        entries, folders = [], set()
        for p in sorted(tree):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self.server.entry(p, tree[p]))
        return [
            {"type": "directory", "path": f, "oid": git_oid(f.encode()), "size": 0} for f in sorted(folders)
        ] + entries

    def _commit(self, repo: Repo, repo_type: str, repo_id: str, revision: str):
        files, deleted = {}, []
        for line in self.body.splitlines():
            op = json.loads(line)
            key, value = op["key"], op["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.server.lfs:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = self.server.lfs[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key}")
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        sha = repo.commit(revision, files, tuple(deleted))
        prefix = "datasets/" if repo_type == "dataset" else ""
        return self._json(
            {"commitUrl": f"{self.server.url}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        )

    def _lfs_batch(self, repo_type: str, repo_id: str):
        self._repo(repo_type, repo_id, write=True)
        objects = []
        for obj in json.loads(self.body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.lfs:
                answer["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}/{obj['size']}", "header": {}}
                }
            objects.append(answer)
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str, size: str):
        if self.server.die_on == "lfs":
            self._die()
        if hashlib.sha256(self.body).hexdigest() != oid or len(self.body) != int(size):
            raise HubError(400, "uploaded content does not match its oid and size")
        self.server.lfs[oid] = self.body
        return self._json({})

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_type, repo_id)
        sha = self._revision(repo, revision)
        content = repo.commits[sha].get(path)
        if content is None:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        entry = self.server.entry(path, content)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{etag}"', "X-Repo-Commit": sha}
        if "lfs" in entry:  # the Hub names the LFS object for files it serves from its CDN
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))}
        return 200, headers, content
