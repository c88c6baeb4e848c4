"""What the command-line programs share (gpt2_ascend/commands/, the data modules' `python -m` mains, demo.py): a
leaf that imports nothing of the library but fileio; library functions never print, they raise."""
from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys

_subcommand: str | None = None  # the gpt2-convert / gpt2-prepare subcommand being run: part of the program's name


def invoked_words(fallback: str = "") -> list[str]:
    """The program as the user started it, for --help examples and hints: `python train.py` (or
    `python convert/mindspore_to_hf.py`, argv[0] as typed) from a checkout, `gpt2-train` / `gpt2-convert
    mindspore-to-hf` once installed (a console script's name, not its path), `python -m gpt2_ascend.data.wikitext2`.
    `fallback` when main() was called from Python with its own argv (no command line to echo)."""
    if fallback:
        return shlex.split(fallback)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    argv0 = sys.argv[0] if sys.argv else ""
    if spec is not None and spec.name not in ("__main__", None):  # python -m package.module
        words = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif argv0.endswith(".py"):
        words = ["python", argv0]
    else:
        words = [os.path.basename(argv0) or "python"]
    return words + ([_subcommand] if _subcommand else [])


def invoked_as(fallback: str = "") -> str:
    return shlex.join(invoked_words(fallback))


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every program here uses it. No silent abbreviations (`--max` is not `--max_steps`); each
    `--long_flag` also answers to `--long-flag` (the spelling HF's and torch's tools use), without showing it twice
    in --help; an unknown flag is answered with the closest known one; errors are one line; `%(prog)s` in the
    description and examples is the program as the user invoked it."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, prog=prog or invoked_as(), **kwargs)

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        _add_dashed_aliases(self, action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_with_aliases(*names, **kw):
            action = add(*names, **kw)
            _add_dashed_aliases(self, action)
            return action
        group.add_argument = add_with_aliases
        return group

    def error(self, message: str):
        print(f"error: {_with_suggestions(message, self._known_flags())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def _known_flags(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings]


def _add_dashed_aliases(parser: argparse.ArgumentParser, action: argparse.Action):
    """Register --a-b for each --a_b of `action`, for parsing only (--help keeps the one spelling)."""
    for flag in action.option_strings:
        alias = "--" + flag[2:].replace("_", "-")
        if flag.startswith("--") and alias != flag and alias not in parser._option_string_actions:
            parser._option_string_actions[alias] = action


def _with_suggestions(message: str, known: list[str]) -> str:
    """argparse's 'unrecognized arguments: --max-step 2' with 'did you mean --max_steps?' for each unknown flag."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    hints = []
    for word in message[len(prefix):].split():
        if not word.startswith("--"):
            continue
        flag = word.split("=", 1)[0]
        spelled = {"--" + k[2:].replace("-", "_"): k for k in known if k.startswith("--")}
        close = difflib.get_close_matches("--" + flag[2:].replace("-", "_"), list(spelled), n=1, cutoff=0.6)
        hints.append(f"{flag}: did you mean {spelled[close[0]]}?" if close else f"{flag}: no such flag")
    return message + ("; " + "; ".join(hints) if hints else "")


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
    global _subcommand
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in subcommands:
        width = max(map(len, subcommands))
        lines = [f"usage: {prog} {{{','.join(subcommands)}}} ...  (each has --help)", ""]
        lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in subcommands.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: use one of {', '.join(subcommands)}", file=sys.stderr)
            return 2
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    _subcommand = argv[0]
    return importlib.import_module(subcommands[argv[0]][0]).main(argv[1:])
