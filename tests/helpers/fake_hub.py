"""A minimal HuggingFace-hub HTTP server on 127.0.0.1, enough for huggingface_hub.snapshot_download:
the model-info API and the resolve endpoint, serving the files of local folders, with byte ranges (a
resumed download asks for the rest of a file) and, on request, a connection that breaks mid-file."""
import hashlib
import http.server
import json
import os
import threading
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict, interrupt: dict | None = None):
        """repos: {"user/name": "/local/folder"}; interrupt: {"file name": n} sends the first GET of that file
        only n bytes (with the full Content-Length) and then drops the connection."""
        self.repos = repos
        self.interrupt = dict(interrupt or {})
        self.requests = []
        self.downloads = []  # the files sent by a GET (a HEAD only asks for their metadata)
        self.ranges = []  # (file name, first byte asked for) of each GET with a Range header
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(head=True)

            def do_GET(self):
                self.respond(head=False)

            def respond(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(path)
                if path.startswith("/api/models/") and "/tree/" in path:
                    repo = path[len("/api/models/"):].split("/tree/")[0]
                    if repo not in hub.repos:
                        return self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    folder = hub.repos[repo]
                    return self.send_json(200, [
                        {"type": "file", "path": f, "size": os.path.getsize(os.path.join(folder, f)),
                         "oid": hashlib.sha1(open(os.path.join(folder, f), "rb").read()).hexdigest()}
                        for f in sorted(os.listdir(folder))])
                if path.startswith("/api/models/"):
                    repo = path[len("/api/models/"):].split("/revision/")[0]
                    if repo not in hub.repos:
                        return self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    files = sorted(os.listdir(hub.repos[repo]))
                    return self.send_json(200, {"id": repo, "modelId": repo, "sha": COMMIT,
                                                "siblings": [{"rfilename": f} for f in files]})
                for repo, folder in hub.repos.items():
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        name = path[len(prefix):].split("/", 1)[1]
                        file = os.path.join(folder, name)
                        if not os.path.isfile(file):
                            return self.send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                        data = open(file, "rb").read()
                        etag = hashlib.sha256(data).hexdigest()
                        start = self.range_start()
                        if not head:
                            hub.downloads.append(name)
                        if not head and start:
                            hub.ranges.append((name, start))
                        self.send_response(206 if start else 200)
                        self.send_header("Content-Length", str(len(data) - start))
                        if start:
                            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                        self.send_header("ETag", '"' + etag + '"')
                        self.send_header("X-Repo-Commit", COMMIT)
                        self.end_headers()
                        if head:
                            return
                        cut = hub.interrupt.pop(name, None)
                        if cut is not None:  # a broken connection: part of the body, then nothing
                            self.wfile.write(data[start:start + cut])
                            self.wfile.flush()
                            self.close_connection = True
                            return
                        self.wfile.write(data[start:])
                        return
                self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def range_start(self) -> int:
                """The first byte of a `Range: bytes=N-` request (0 without one)."""
                header = self.headers.get("Range", "")
                if header.startswith("bytes=") and header.endswith("-"):
                    return int(header[len("bytes="):-1])
                return 0

            def send_json(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
