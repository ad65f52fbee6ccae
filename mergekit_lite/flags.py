"""mergekit's command-line flags and what each one becomes here, in one table.

A mergekit user's first try is their usual command line, so ``mergekit-yaml``, ``mergekit-multi``
and ``mergekit-lite run`` take mergekit 0.1.5's merge flags. :data:`FLAGS` says, per flag, what it
does in mergekit-lite; the same table builds the parsers, turns the parsed flags into
:class:`~mergekit_lite.merge.Options` fields (:func:`apply_flags`) and is README's table (checked by
``tests/test_flags.py``). A flag falls in one of four kinds:

- *mapped*: it sets the option that does the same thing here (``--cuda`` is ``--device cuda``);
- *accepted, no effect*: what it asks for is what mergekit-lite always does (``--lazy-unpickle``:
  tensors are always read lazily), so results are the same;
- *noted*: it cannot be honoured but results do not depend on it (``--multi-gpu``); a note says so
  on stderr and names what to use instead;
- *refused*: ignoring it would change the output (``--no-safe-serialization``); the run stops with
  exit status 2 before anything is read.

Nothing here imports torch: building a parser must stay instant (``--help``).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import closest


@dataclass
class Settings:
    """What the given flags ask for: Options fields, process settings, notes and refusals."""

    options: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    cache: str | None = None
    verbose: int = 0
    notes: list[str] = field(default_factory=list)  # flags not honoured (results unaffected)
    refused: list[str] = field(default_factory=list)  # flags whose absence would change results
    given: list[tuple[str, str]] = field(default_factory=list)  # (flag as given, what it became), for -v


@dataclass(frozen=True)
class Flag:
    """One mergekit flag: its spellings, how it is parsed, what it does here, and how."""

    names: tuple[str, ...]  # mergekit's option strings; a "bool" flag also has --no-<name>
    kind: str  # "bool" (--x/--no-x), "switch" (--x), "int", "str", "count"
    ours: str  # what mergekit-lite does with it (--help, README's table)
    apply: Callable[[Any, Settings], None]
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return "mk_" + self.names[-1].lstrip("-").replace("-", "_")

    def given(self, value: Any) -> bool:
        """Whether the command line gave it (``--no-x`` gives False; -v absent is a count of 0)."""
        return value is not None and not (self.kind == "count" and value == 0)


def _option(name: str, convert: Callable[[Any], Any] = lambda v: v):
    return lambda v, s: s.options.__setitem__(name, convert(v))


def _no_effect(v: Any, s: Settings) -> None:
    """Accepted: what the flag asks for is what mergekit-lite always does."""


def _note(text: str) -> Callable[[Any, Settings], None]:
    return lambda v, s: s.notes.append(text) if v else None


def _refuse(text: str, when: bool) -> Callable[[Any, Settings], None]:
    return lambda v, s: s.refused.append(text) if v is when else None


def _cuda(v: Any, s: Settings) -> None:
    s.options.setdefault("device", "cuda" if v else "cpu")  # --device wins, as in mergekit


def _gpu_rich(v: Any, s: Settings) -> None:
    if v:
        _cuda(True, s)
        s.notes.append(_ONE_DEVICE)


_ONE_DEVICE = ("--multi-gpu / --gpu-rich: mergekit-lite computes on one device; choose it with --device cuda:N "
               "(reads and writes already overlap the math)")
_LAZY = "accepted, no effect: tensors are always read lazily, one at a time, from safetensors (pickled .bin is refused)"

FLAGS: tuple[Flag, ...] = (
    Flag(("--device",), "str", "--device: auto (default: CUDA when available), cpu, cuda, cuda:N",
         _option("device"), "DEVICE"),
    Flag(("--cuda",), "bool", "--device cuda (--no-cuda: --device cpu)", _cuda),
    Flag(("--gpu-rich",), "switch", "--device cuda, on one device (noted)", _gpu_rich),
    Flag(("--multi-gpu",), "bool", "noted, not honoured: one device (--device cuda:N)", _note(_ONE_DEVICE)),
    Flag(("--low-cpu-memory",), "bool", "accepted, no effect: --max-memory bounds the tensor bytes held",
         _no_effect),
    Flag(("--read-to-gpu",), "bool", "accepted, no effect: tensors are read on the CPU and moved to --device "
         "for the math", _no_effect),
    Flag(("-j", "--num-threads"), "int", "torch's CPU threads (intra- and inter-op), as in mergekit",
         lambda v, s: setattr(s, "threads", v), "N"),
    Flag(("--out-shard-size",), "str", "parameters per output shard, mergekit's unit: 1B = 10^9 parameters "
         "(2 GB of bfloat16); --max-shard-size is the same cap in bytes [default: 5GB of bytes]",
         _option("out_shard_size"), "COUNT"),
    Flag(("--copy-tokenizer",), "bool", "copy the tokenizer files of the base (or tokenizer_source) model [on]",
         _option("copy_tokenizer")),
    Flag(("--write-model-card",), "bool", "write README.md (model card) and mergekit_config.yml [on]",
         _option("write_model_card")),
    Flag(("--clone-tensors",), "bool", "accepted, no effect: a repeated layer is always written as its own copy",
         _no_effect),
    Flag(("--safe-serialization",), "bool", "safetensors only; --no-safe-serialization is refused (pickle files "
         "can run code when loaded)", _refuse("--no-safe-serialization: mergekit-lite writes safetensors only "
                                              "(pickled .bin files can run code when loaded); drop the flag", False)),
    Flag(("--random-seed",), "int", "--seed N: seeds DARE/DELLA masks (and MoE random routers) per tensor",
         _option("seed"), "N"),
    Flag(("--lazy-unpickle",), "bool", _LAZY, _no_effect),
    Flag(("--lazy-loader",), "bool", _LAZY, _no_effect),
    Flag(("--trust-remote-code",), "bool", "accepted, no effect: mergekit-lite never runs model code", _no_effect),
    Flag(("--allow-crimes",), "bool", "merge models whose config.json names different architectures (a warning; "
         "tensor names and shapes must still match)", _option("allow_crimes")),
    Flag(("--unsafe-truncate-embeddings",), "bool", "refused: embeddings are never truncated to the smallest "
         "vocabulary", _refuse("--unsafe-truncate-embeddings: mergekit-lite never truncates embeddings to the "
                               "smallest vocabulary; merge models with the same vocabulary, or choose the "
                               "tokenizer with tokenizer_source:", True)),
    Flag(("--transformers-cache",), "str", "Hugging Face cache folder for downloads (sets HF_HUB_CACHE)",
         lambda v, s: setattr(s, "cache", v), "PATH"),
    Flag(("--lora-merge-cache",), "str", "accepted, unused: adapters are never written out as merged copies",
         _no_effect, "PATH"),
    Flag(("--lora-merge-dtype",), "str", "noted, not honoured: adapters are applied in float32",
         _note("--lora-merge-dtype: adapters are applied in float32 and rounded to the base's dtype, as mergekit "
               "does without this flag"),
         "DTYPE"),
    Flag(("--async-write",), "bool", "accepted, no effect: shards are always written by a background thread "
         "as tensors are computed", _no_effect),
    Flag(("--write-threads",), "int", "accepted, no effect: one background writer", _no_effect, "N"),
    Flag(("-v",), "count", "-v: also print what each mergekit flag given became",
         lambda v, s: setattr(s, "verbose", v)),
    Flag(("--quiet",), "bool", "-q/--quiet: no progress bar, no summary line", _option("quiet")),
)


def add_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add mergekit's flags to `parser`; a flag whose spelling the parser already has (``run``'s own
    ``--device``, ``--quiet``) is left to it."""
    group = parser.add_argument_group("mergekit's flags (mergekit 0.1.5 command lines run unchanged)")
    taken = set(parser._option_string_actions)
    for flag in FLAGS:
        if taken & set(flag.names):
            continue
        kw: dict[str, Any] = {"dest": flag.dest, "help": flag.ours, "default": None}
        if flag.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif flag.kind == "switch":
            kw["action"] = "store_true"
        elif flag.kind == "count":
            kw.update(action="count", default=0)
        else:
            kw.update(type=int if flag.kind == "int" else str, metavar=flag.metavar)
        group.add_argument(*flag.names, **kw)
    return group


def apply_flags(args: argparse.Namespace) -> Settings:
    """What the mergekit flags given in `args` ask for (flags absent from `args` are skipped)."""
    settings = Settings()
    for flag in FLAGS:
        value = getattr(args, flag.dest, None)
        if not flag.given(value):
            continue
        flag.apply(value, settings)
        spelled = flag.names[-1] if value is not False else "--no-" + flag.names[-1].lstrip("-")
        settings.given.append((spelled, flag.ours))
    return settings


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for an unknown flag or command (the closest known one)."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen(ns)
            flags = [x for x in extras if x.startswith("-")]
            hints = [f"{x} (did you mean {guess}?)" if (guess := closest(x.split("=")[0], parser._known())) else x
                     for x in flags] or extras
            parser.error("unrecognized arguments: " + " ".join(hints))
        return ns

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m and (guess := closest(m.group(1), re.findall(r"'?([\w-]+)'?", m.group(2)))):
            message += f"; did you mean '{guess}'?"
        super().error(message)

    def _known(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--") or len(s) == 2]

    def _chosen(self, ns: argparse.Namespace) -> "Parser":
        """The subcommand's parser that read the arguments (or this one)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
                return chosen._chosen(ns) if isinstance(chosen, Parser) else self
        return self


def report(settings: Settings) -> None:
    """Print the notes (always) and, with -v, what each given flag became, on stderr."""
    for text in settings.notes:
        print(f"mergekit-lite: note: {text}", file=sys.stderr)
    if settings.verbose:
        for spelled, ours in settings.given:
            print(f"mergekit-lite: {spelled}: {ours}", file=sys.stderr)
