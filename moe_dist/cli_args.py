"""What every moe_dist command line shares: no prefix matching, one-line refusals with a "did you mean".

``Parser`` is ``argparse.ArgumentParser`` with ``allow_abbrev=False`` (``--max-step 1`` is not taken as
``--max-steps``) and an ``error`` that prints one line, naming the closest flag or choice (``difflib``)
instead of the whole usage block. ``did_you_mean`` is the same suggestion for anything else with a
fixed set of names: ``--set`` fields, presets, commands. Torch-free: ``moe --help`` imports it.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Iterable, NoReturn


def closest(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """The names of ``choices`` nearest to ``word`` (difflib ratio >= 0.7: near misses, not guesses), best first."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.7)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' for the nearest of ``choices``, or '' when none is near."""
    hits = closest(word, choices)
    return f"; did you mean {hits[0]}?" if hits else ""


_UNRECOGNIZED = "unrecognized arguments: "
_CHOICE = re.compile(r"argument (?P<arg>\S+): invalid choice: '(?P<found>[^']*)' \(choose from (?P<all>.*)\)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that never matches a flag by its prefix and refuses in one line."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own signature
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _flags(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--")]

    def explain(self, message: str) -> str:
        """argparse's message, with the flag or choice the user most likely meant."""
        if message.startswith(_UNRECOGNIZED):
            words = message[len(_UNRECOGNIZED):].split()
            flags = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            if flags:
                parts = [f"{f}{did_you_mean(f, self._flags())}" for f in flags]
                noun = "flag" if len(flags) == 1 else "flags"
                return f"unknown {noun} " + ", ".join(parts)
            return f"unexpected argument(s) {' '.join(words)}"
        m = _CHOICE.search(message)
        if m:
            options = [o.strip().strip("'") for o in m.group("all").split(",")]
            hint = did_you_mean(m.group("found"), options)
            return (f"argument {m.group('arg')}: {m.group('found')!r} is not one of {', '.join(options)}"
                    + hint)
        return message

    def error(self, message: str) -> NoReturn:
        from .run.launcher_report import record_for_launcher

        line = f"{self.prog}: error: {self.explain(message)} (see {self.prog} --help)"
        print(line, file=sys.stderr)
        record_for_launcher(line)  # under a launcher its failure summary ends with the line too
        self.exit(2)


# Names users bring from other trainers, pointed at ours: ``--set train.lr=...`` names the real fields.
FIELD_ALIASES: dict[str, str] = {
    "lr": "--lr (the main optimizer's peak LR), or train.muon_lr / train.adamw_lr",
    "learning_rate": "--lr (the main optimizer's peak LR), or train.muon_lr / train.adamw_lr",
    "batch_size": "--global-batch-size [train.global_batch_size] or --micro-batch-size [train.micro_batch_size]",
    "steps": "--max-steps [train.max_steps]",
    "block_size": "--seq-len [train.seq_len] (and model.max_seq_len)",
    "context_length": "--seq-len [train.seq_len] (and model.max_seq_len)",
}


def field_hint(key: str, known: Iterable[str]) -> str:
    """'; did you mean ...?' for a config key that does not exist: an alias, the same field under its
    own section (train.d_model -> model.d_model), else the nearest field name."""
    bare = key.rsplit(".", 1)[-1]
    if bare in FIELD_ALIASES:
        return f"; did you mean {FIELD_ALIASES[bare]}?"
    known = list(known)
    by_name = {k.rsplit(".", 1)[-1]: k for k in known}
    if bare in by_name:
        return f"; did you mean {by_name[bare]}?"
    near = closest(bare, by_name)
    return f"; did you mean {by_name[near[0]]}?" if near else ""
