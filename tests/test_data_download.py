"""Checksum-verified downloads against a local HTTP server on 127.0.0.1."""
import hashlib
import http.server
import os
import threading

import pytest

from gpt2_ascend.data import download as dl


class FileServer:
    """Serves a folder over HTTP on 127.0.0.1; honours `Range: bytes=N-` when ranges=True."""

    def __init__(self, folder, ranges=True):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                file = os.path.join(folder, self.path.lstrip("/"))
                if not os.path.isfile(file):
                    self.send_error(404, "Not Found")
                    return
                data = open(file, "rb").read()
                start = 0
                if ranges and self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].rstrip("-"))
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    data = os.urandom(300_000)
    (folder / "blob.bin").write_bytes(data)
    return folder, data, hashlib.sha256(data).hexdigest()


def test_download_verifies_and_renames_atomically(payload, tmp_path):
    folder, data, sha = payload
    dest = tmp_path / "out" / "blob.bin"
    with FileServer(folder) as srv:
        assert dl.download(f"{srv.url}/blob.bin", str(dest), sha, progress=False) == str(dest)
        assert dest.read_bytes() == data and not os.path.exists(str(dest) + ".part")
        dl.download(f"{srv.url}/blob.bin", str(dest), sha, progress=False)  # present and verified: no request
        assert len(srv.requests) == 1


def test_checksum_mismatch_deletes_the_download(payload, tmp_path):
    folder, _, _ = payload
    dest = tmp_path / "blob.bin"
    with FileServer(folder) as srv:
        with pytest.raises(ValueError, match=r"checksum mismatch for http://127.0.0.1:\d+/blob.bin: expected "
                                             r"sha256 0{64}, got [0-9a-f]{64}; the download was deleted"):
            dl.download(f"{srv.url}/blob.bin", str(dest), "0" * 64, progress=False)
    assert os.listdir(tmp_path) == ["served"]  # neither the file nor its .part


@pytest.mark.parametrize("ranges", [True, False])
def test_interrupted_download_resumes_or_restarts(payload, tmp_path, ranges):
    folder, data, sha = payload
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(data[:123_456])  # what an interrupted run left
    with FileServer(folder, ranges=ranges) as srv:
        dl.download(f"{srv.url}/blob.bin", str(dest), sha, progress=False)
        assert srv.requests[0] == ("/blob.bin", "bytes=123456-")
        # a server without Range support answers 200 with the whole file: the .part is started over
        assert len(srv.requests) == 1
    assert dest.read_bytes() == data and not (tmp_path / "blob.bin.part").exists()


def test_complete_stale_part_file_is_started_over(payload, tmp_path):
    folder, data, sha = payload
    (tmp_path / "blob.bin.part").write_bytes(data + b"junk")
    with FileServer(folder) as srv:
        dl.download(f"{srv.url}/blob.bin", str(tmp_path / "blob.bin"), sha, progress=False)
        assert srv.requests == [("/blob.bin", f"bytes={len(data) + 4}-"), ("/blob.bin", None)]  # 416, then all
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_http_error_is_one_line(payload, tmp_path):
    folder, data, sha = payload
    with FileServer(folder) as srv:
        with pytest.raises(OSError, match=r"download of http://127.0.0.1:\d+/missing.bin failed: HTTP 404"):
            dl.download(f"{srv.url}/missing.bin", str(tmp_path / "m.bin"), sha, progress=False)
        assert sorted(os.listdir(tmp_path)) == ["served"]  # no empty m.bin.part left behind
        (tmp_path / "m.bin.part").write_bytes(data[:1000])  # a partial download is kept, to resume later
        with pytest.raises(OSError, match="HTTP 404"):
            dl.download(f"{srv.url}/missing.bin", str(tmp_path / "m.bin"), sha, progress=False)
        assert (tmp_path / "m.bin.part").read_bytes() == data[:1000]


def test_ensure_data_dir_fetches_missing_files_from_mirror(data_dir, tmp_path, monkeypatch):
    """GPT2_DATA_URL points at a mirror laid out like the data directory (here: the shared data, served)."""
    target = tmp_path / "data"
    (target / "sst2").mkdir(parents=True)
    (target / "sst2" / "train.tsv").write_text("already here\n")  # present files are not fetched
    with FileServer(data_dir) as srv:
        monkeypatch.setenv("GPT2_DATA_URL", srv.url + "/")
        monkeypatch.setenv("GPT2_DATA_DIR", str(target))
        assert dl.dataset_path("gpt2") == str(target / "gpt2")
        assert dl.dataset_path("dev.tsv") == str(target / "sst2" / "dev.tsv")
        assert dl.ensure_data_dir(["sst2"]) == str(target)
        assert sorted(p for p, _ in srv.requests) == ["/gpt2/merges.txt", "/gpt2/vocab.json", "/sst2/dev.tsv"]
    for name in ("gpt2/vocab.json", "gpt2/merges.txt", "sst2/dev.tsv"):
        assert dl.sha256_file(str(target / name)) == dl.SHA256[name]
    assert (target / "sst2" / "train.tsv").read_text() == "already here\n"


def test_embedded_checksums_match_shared_sums(data_dir):
    with open(os.path.join(data_dir, "SHA256SUMS")) as f:
        listed = dict(reversed(line.split()) for line in f if line.strip())
    assert listed == dl.SHA256 and set(dl.URLS) == set(dl.SHA256)


def test_unknown_name_and_cli_errors(capsys):
    with pytest.raises(ValueError, match="unknown data file 'wiki.tokens': use one of gpt2, wikitext-2, sst2"):
        dl.dataset_path("wiki.tokens")
    assert dl.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown data file 'nope'") and err.count("\n") == 1


def test_demo_without_data_or_network_fails_in_one_line(payload, tmp_path, monkeypatch, capsys):
    """A checkout away from the shared data, offline: the demo names the fix instead of a traceback."""
    import demo  # the checkout's demo.py (the repository root is importable, as for train.py)
    folder, _, _ = payload
    monkeypatch.setenv("GPT2_DATA_DIR", str(tmp_path / "empty"))
    with FileServer(folder) as srv:  # a mirror without the files: 404 for each
        monkeypatch.setenv("GPT2_DATA_URL", srv.url)
        assert demo.main(["--output_dir", str(tmp_path / "out"), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: download of http://127.0.0.1:"), err
    assert "set GPT2_DATA_DIR to a folder that already holds the data" in err
    assert str(tmp_path / "empty") in err  # where the file may be put
