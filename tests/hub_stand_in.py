"""A stand-in for the Hugging Face hub on 127.0.0.1, for tests of what a library does when it may reach the hub
(HF_ENDPOINT points at it): it serves the files it is given, per repository, as the hub's `resolve` URLs do, answers
404 with the hub's error code for anything else, and records every request."""

from __future__ import annotations

import hashlib
import http.server
import threading
from contextlib import contextmanager

COMMIT = "0" * 40


@contextmanager
def hub_stand_in(files: dict[str, dict[str, bytes]]):
    """Serve `files` ({repo id: {file name: content}}) while the block runs; yields (url, requests)."""
    requests: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self, with_body: bool):
            requests.append(f"{self.command} {self.path}")
            parts = self.path.split("?")[0].strip("/").split("/")  # org / name / resolve / revision / file...
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            data = files.get(repo, {}).get(name) if parts[2:3] == ["resolve"] else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if repo in files else "RepositoryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_HEAD(self):
            self.answer(with_body=False)

        def do_GET(self):
            self.answer(with_body=True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
