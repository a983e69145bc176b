"""A local stand-in for the Hugging Face hub: serves one directory as a model repository through the
endpoints huggingface_hub uses (revision info, file tree, file resolve with HEAD and GET)."""

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self, repo_id: str, folder: str, revisions: dict[str, str]):
        self.repo_id, self.folder, self.revisions = repo_id, folder, revisions  # revision -> commit sha
        self.requests: list[tuple[str, str]] = []
        self.files = sorted(os.listdir(folder))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.handle(self, head=True)

            def do_GET(self):
                server.handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _commit(self, revision: str) -> str | None:
        if revision in self.revisions.values():
            return revision
        return self.revisions.get(revision)

    def _etag(self, name: str) -> str:
        with open(os.path.join(self.folder, name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = req.path.split("?")[0]
        self.requests.append((req.command, path))
        repo = re.escape(self.repo_id)
        m = re.fullmatch(rf"/api/models/{repo}/revision/([^/]+)", path)
        if m:
            commit = self._commit(m.group(1))
            if commit is None:
                return self._send(
                    req, 404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"}
                )
            siblings = [{"rfilename": name} for name in self.files]
            body = {
                "id": self.repo_id,
                "modelId": self.repo_id,
                "sha": commit,
                "siblings": siblings,
                "private": False,
            }
            return self._send(req, 200, json.dumps(body).encode(), head=head)
        m = re.fullmatch(rf"/api/models/{repo}/tree/([^/]+)(/.*)?", path)
        if m:
            if self._commit(m.group(1)) is None:
                return self._send(
                    req, 404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"}
                )
            tree = []
            for name in self.files:
                size = os.path.getsize(os.path.join(self.folder, name))
                tree.append({"type": "file", "oid": self._etag(name)[:40], "size": size, "path": name})
            return self._send(req, 200, json.dumps(tree).encode(), head=head)
        m = re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path)
        if m:
            commit, name = self._commit(m.group(1)), m.group(2)
            if commit is None or name not in self.files:
                return self._send(req, 404, b"not found", {"X-Error-Code": "EntryNotFound"})
            with open(os.path.join(self.folder, name), "rb") as f:
                data = f.read()
            headers = {"X-Repo-Commit": commit, "ETag": f'"{self._etag(name)}"'}
            return self._send(req, 200, data, headers, head=head)
        self._send(req, 404, b"not found", {"X-Error-Code": "RepoNotFound"})

    @staticmethod
    def _send(req, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        req.send_response(status)
        req.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.end_headers()
        if not head:
            req.wfile.write(body)
