"""The data directory (GPT2_DATA_DIR) and checksum-verified downloads of its files.

The data directory holds, under these relative names, the public files below; `dataset_path(name)` returns a
file (or folder) of it and downloads what is missing. Every download streams to `DEST.part`, is verified
against the sha256 listed here (the checksums of shared/data/SHA256SUMS), then renamed into place; an
interrupted download resumes from the .part file (HTTP Range) when the server allows it.

Relative names and their public URLs:
  gpt2/vocab.json, gpt2/merges.txt  https://huggingface.co/openai-community/gpt2/resolve/main/{vocab.json,merges.txt}
  wikitext-2/wiki.{split}.tokens    https://raw.githubusercontent.com/pytorch/examples/main/
                                    word_language_model/data/wikitext-2/{split}.txt
                                    (byte-identical to WikiText-2 v1's wiki.*.tokens)
  sst2/{train,dev}.tsv              GLUE SST-2 as mirrored by github.com/eyalbd2/Reproducing-AutoPrompt at commit
                                    53e9e22 (glue_data/SST-2/train_full.tsv and dev.tsv: the full 67,349 and
                                    872-row GLUE files; that repository's train.tsv is a subset)

GPT2_DATA_URL=BASE replaces all of them by BASE/RELATIVE_NAME (a mirror laid out like the data directory).

    python -m gpt2_ascend.data.download                 # everything missing in the data directory
    python -m gpt2_ascend.data.download gpt2 wiki.valid.tokens --data_dir /data/gpt2
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import urllib.error
import urllib.request

from ..cli import ArgumentParser, print_error
from ..fileio import fsync_dir, reporting_disk_full, sha256_file

HF_GPT2 = "https://huggingface.co/openai-community/gpt2/resolve/main"
WIKITEXT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
SST2 = ("https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/"
        "53e9e221b58e5ed882a56c9d8be838b895351165/glue_data/SST-2")

URLS = {
    "gpt2/vocab.json": f"{HF_GPT2}/vocab.json",
    "gpt2/merges.txt": f"{HF_GPT2}/merges.txt",
    "wikitext-2/wiki.train.tokens": f"{WIKITEXT2}/train.txt",
    "wikitext-2/wiki.valid.tokens": f"{WIKITEXT2}/valid.txt",
    "wikitext-2/wiki.test.tokens": f"{WIKITEXT2}/test.txt",
    "sst2/train.tsv": f"{SST2}/train_full.tsv",
    "sst2/dev.tsv": f"{SST2}/dev.tsv",
}

# shared/data/SHA256SUMS
SHA256 = {
    "gpt2/vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "wikitext-2/wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "wikitext-2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "sst2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "sst2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
}

# folder names that stand for all of their files
GROUPS = {"gpt2": ("gpt2/vocab.json", "gpt2/merges.txt"),
          "wikitext-2": tuple(n for n in URLS if n.startswith("wikitext-2/")),
          "sst2": ("sst2/train.tsv", "sst2/dev.tsv")}

CHUNK = 1 << 16


def default_data_dir() -> str:
    """GPT2_DATA_DIR, else the ../shared/data folder beside the checkout, else the cache home's data/."""
    env = os.environ.get("GPT2_DATA_DIR")
    if env:
        return env
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shared = os.path.join(os.path.dirname(repo_root), "shared", "data")
    if os.path.isdir(shared):
        return shared
    return os.path.join(cache_home(), "data")


def cache_home() -> str:
    """Where the project keeps what it can make again (downloads, data prepared for the tiny recipes), never the
    working directory: GPT2_CACHE, else the platform's user cache folder (XDG_CACHE_HOME or ~/.cache on Linux,
    ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows) + gpt2_ascend. A recipe path may start with $GPT2_CACHE."""
    env = os.environ.get("GPT2_CACHE")
    if env:
        return os.path.expanduser(env)
    if sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
    elif os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2_ascend")


def url_for(name: str) -> str:
    base = os.environ.get("GPT2_DATA_URL")
    return f"{base.rstrip('/')}/{name}" if base else URLS[name]


@contextlib.contextmanager
def _locked(f):
    """An exclusive lock on the .part file, so two processes never write the same download."""
    try:
        import fcntl
    except ImportError:  # not on Windows: no lock
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _open(url: str, start: int, timeout: float, dest: str):
    headers = {"User-Agent": "gpt2_ascend-data/1"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part is already complete or stale: start over
            return None
        raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason} ({_remedy(dest)})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"download of {url} failed: {reason} (no network? {_remedy(dest)})") from None


def _remedy(dest: str) -> str:
    return (f"set GPT2_DATA_DIR to a folder that already holds the data, GPT2_DATA_URL to a mirror, or put the "
            f"file at {dest}")


def _resumes_at(response, start: int) -> bool:
    """Whether the server answered the Range request with the bytes from start on."""
    if response.status != 206:
        return False
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == start


def download(url: str, dest: str, sha256: str, timeout: float = 60.0, progress: bool = True) -> str:
    """Fetch url to dest unless dest already has this sha256: stream to dest.part (resumed when present and
    the server honours Range), verify the sha256, rename into place. A mismatch deletes the download, and so
    does any failure before a byte arrived (a partial download is kept, to resume)."""
    if os.path.isfile(dest) and sha256_file(dest) == sha256:
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    try:
        _fetch(url, dest, part, sha256, timeout, progress)
    except BaseException:
        with contextlib.suppress(OSError):
            if os.path.getsize(part) == 0:  # nothing to resume from: leave no trace (a partial one is kept)
                os.remove(part)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return dest


def _fetch(url: str, dest: str, part: str, sha256: str, timeout: float, progress: bool):
    """download()'s body: stream into part under its lock, verify, rename to dest."""
    from ..progress import progress_bar
    with open(part, "ab+") as f, _locked(f):
        digest = hashlib.sha256()
        f.seek(0)
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
        start = f.tell()
        response = _open(url, start, timeout, dest)
        if start and (response is None or not _resumes_at(response, start)):
            f.truncate(0)  # no resume: the server ignored the Range (200, whole file) or refused it (416)
            digest, start = hashlib.sha256(), 0
            if response is None or response.status != 200:
                if response is not None:
                    response.close()
                response = _open(url, 0, timeout, dest)
        with response:
            total = response.headers.get("Content-Length")
            total = start + int(total) if total and total.isdigit() else None
            with progress_bar(total=total, initial=start, unit="B", unit_scale=True, leave=False,
                      desc=os.path.basename(dest), disable=not progress) as bar, \
                    reporting_disk_full(os.path.dirname(os.path.abspath(dest)), total, os.path.basename(dest)):
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
        got = digest.hexdigest()
        if got != sha256:
            os.remove(part)
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the download "
                             f"was deleted (wrong mirror in GPT2_DATA_URL, or a changed file upstream)")
        os.replace(part, dest)


def _names(name: str) -> tuple[str, ...]:
    """The relative file names a dataset name stands for: a group, a relative name, or a unique basename."""
    name = name.strip("/")
    if name in GROUPS:
        return GROUPS[name]
    if name in URLS:
        return (name,)
    matches = [n for n in URLS if os.path.basename(n) == name]
    if len(matches) == 1:
        return tuple(matches)
    known = ", ".join(list(GROUPS) + list(URLS))
    raise ValueError(f"unknown data file {name!r}: use one of {known}")


def ensure_data_dir(names=None, root: str | None = None, verify: bool = False, progress: bool = True) -> str:
    """The data directory, after downloading those of its files (default: all) that are missing.
    verify=True also checks the checksums of files already there (and downloads them again on mismatch)."""
    root = root or default_data_dir()
    wanted = [n for name in (names or list(GROUPS)) for n in _names(name)]
    for name in wanted:
        path = os.path.join(root, name)
        if os.path.isfile(path) and not verify:
            continue
        if os.path.isfile(path) and sha256_file(path) == SHA256[name]:
            continue
        try:
            download(url_for(name), path, SHA256[name], progress=progress)
        except PermissionError:
            raise OSError(f"data directory {root} is not writable, so {name} cannot be downloaded: "
                          f"set GPT2_DATA_DIR to a writable folder") from None
    return root


def dataset_path(name: str, root: str | None = None) -> str:
    """The path of a data file ('wiki.valid.tokens', 'sst2/dev.tsv') or folder ('gpt2', 'wikitext-2', 'sst2')
    in the data directory, downloaded first when missing."""
    root = ensure_data_dir([name], root)
    key = name.strip("/")
    if key in GROUPS:
        return os.path.join(root, key)
    return os.path.join(root, _names(key)[0])


def main(argv=None) -> int:
    parser = ArgumentParser(
        description="Download the missing files of the data directory ($GPT2_DATA_DIR), verifying sha256.",
        epilog="examples:\n  %(prog)s\n"
               "  %(prog)s gpt2 wiki.valid.tokens --data_dir /data/gpt2\n"
               "  GPT2_DATA_URL=http://mirror.local/gpt2-data %(prog)s sst2\n"
               f"names: {', '.join(list(GROUPS) + list(URLS))}")
    parser.add_argument("names", nargs="*", help="files or folders to fetch (default: all)")
    parser.add_argument("--data_dir", default=None, help="target folder (default: $GPT2_DATA_DIR)")
    parser.add_argument("--verify", action="store_true", help="also check the sha256 of files already there")
    args = parser.parse_args(argv)
    try:
        root = ensure_data_dir(args.names or None, args.data_dir, verify=args.verify)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2
    print(f"data directory ready: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
