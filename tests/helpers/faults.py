"""What every fault case checks: one `error:` line and nothing lost (tests/test_faults.py)."""
import hashlib
import os


def digest(root) -> dict:
    """{relative path: sha256 of the file, or '<dir>'} of everything under root ({} if it does not exist)."""
    root = str(root)
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = "<dir>"
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not os.path.exists(path):  # a dangling link: what it points to
                found[os.path.relpath(path, root)] = "<link to " + os.readlink(path) + ">"
                continue
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def assert_kept(before: dict, root, exact: bool = True):
    """Nothing that existed under root was lost or changed; with exact, nothing was added either."""
    after = digest(root)
    lost = sorted(p for p in before if p not in after)
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not lost and not changed, f"lost {lost}, changed {changed}"
    if exact:
        added = sorted(p for p in after if p not in before)
        assert not added, f"added {added}"


def assert_one_error(err: str, *fragments: str):
    """stderr ends in one `error: ...` line that holds every fragment, and shows no traceback."""
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("error: "), err
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last
