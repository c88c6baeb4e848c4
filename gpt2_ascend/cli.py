"""What the command-line programs share (gpt2_ascend/commands/, the data modules' `python -m` mains, demo.py): a
leaf that imports nothing of the library but fileio; library functions never print, they raise."""
from __future__ import annotations

import sys


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): errors are one line. (A
    KeyError's message is its argument, not that argument's repr.)"""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def print_error(e: BaseException, prefix: str = ""):
    print(f"{prefix}error: {error_line(e)}", file=sys.stderr)


def write_output_json(obj, path: str, flag: str = "--output_json"):
    """A CLI's JSON result, strict and written atomically. A path that cannot be written is a one-line
    ValueError naming the flag; the CLIs print their result first, so it is not lost."""
    from .fileio import write_json
    try:
        write_json(obj, path)
    except OSError as e:
        reason = e.strerror.lower() if e.strerror else str(e)  # a DiskFullError's own line keeps its paths
        raise ValueError(f"cannot write {flag} {path}: {reason} (the result printed above stands)") from None


def run_subcommand(prog: str, subcommands: dict, argv: list) -> int:
    """`prog NAME ARGS...`: run the main(ARGS) of the module subcommands[NAME] = (module, summary)."""
    import importlib
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in subcommands:
        width = max(map(len, subcommands))
        lines = [f"usage: {prog} {{{','.join(subcommands)}}} ...  (each has --help)", ""]
        lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in subcommands.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: use one of {', '.join(subcommands)}", file=sys.stderr)
            return 2
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return importlib.import_module(subcommands[argv[0]][0]).main(argv[1:])
