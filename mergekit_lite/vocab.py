"""Vocabulary alignment: merging models whose vocabularies differ, row by row in the output's vocabulary.

A step with ``tokenizer_source`` or a ``tokenizer:`` section (mergekit's semantics, checked against
mergekit 0.1.5) builds its output vocabulary here, at compile time, from the inputs' tokenizer files:

- ``base``: the base model's vocabulary (the base, else the first model), without tokens past its
  embedding rows; ``MODEL``: that model's; ``union``: the base's, then every other model's tokens it
  lacks (regular tokens first, in model order, then added tokens, with the first model's settings);
- the ``tokens:`` keys are appended when missing; ``pad_to_multiple_of`` pads the row count.

Every vocabulary-indexed tensor (the input embedding and the heads whose rows are tokens) of every
model is then re-indexed to that vocabulary before it is merged. Output row ``t`` of model ``m`` is
``m``'s own row for token ``t`` when it has the token; otherwise (or when the token's setting says
``force``) a *default* row: the configured source (a model's row for the token or for another
token, or zero); else the row of the only model that has the token; else the base model's row; else
the mean of the rows of the models that have it; zero when none has it. Padding rows are the mean
of the model's rows. So a token present in several models merges their rows, and a token only some
models have takes those rows, exactly as mergekit does.

The work is one node kind (:class:`~mergekit_lite.nodes.AlignVocab`) per merged vocabulary tensor,
streamed like every other node: the row plan is decided here (index tensors, no Python loop over the
vocabulary at run time) and :meth:`RowPlan.apply` gathers the rows. Without a tokenizer setting,
models whose embedding row counts differ are an error that names them and the settings to use.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Mapping

import torch

from .dtypes import element_size
from .errors import MergeError, ShapeMismatch
from .io.vocab import ADDED_FLAGS, TokenizerOutput, Vocab
from .plan.expand import SourceInfo, TensorInfo
from .plan.recipe import TokenizerSpec, TokenSetting
from .plan.schema import MergePlan, ModelRef

_CHUNK_ROWS = 4096  # rows summed at a time for padding rows (bounded float32 scratch)


class VocabularyMismatch(ShapeMismatch):
    """Models whose vocabularies differ, merged without a tokenizer setting."""


def vocab_tensors(tensors: Mapping[str, Any], arch: Any, config: Mapping[str, Any]
                  ) -> tuple[int | None, tuple[str, ...]]:
    """The embedding's row count and the names of the tensors indexed by token (axis 0): the input
    embedding (the embedding-section matrix with ``vocab_size`` rows, else the one with the most
    rows) and the head tensors with that many rows (``lm_head``, ``embed_out``, their biases)."""
    pre = [n for n, t in tensors.items() if arch.section(n) == "pre" and len(t.shape) == 2]
    if not pre:
        return None, ()
    want = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    embed = next((n for n in pre if tensors[n].shape[0] == want), None) or max(pre, key=lambda n: tensors[n].shape[0])
    rows = tensors[embed].shape[0]
    heads = [n for n, t in tensors.items() if arch.section(n) == "post" and t.shape and t.shape[0] == rows
             and len(t.shape) <= 2]
    return rows, (embed, *heads)


class Member:
    """One model of a step as alignment sees it: its embedding rows, its vocabulary tensors, and its
    vocabulary (read from its tokenizer files only when needed; None when it has none we can read)."""

    def __init__(self, ref: ModelRef, label: str, rows: int, names: tuple[str, ...],
                 load: Callable[[], Vocab | None]):
        self.ref, self.label, self.rows, self.names = ref, label, rows, names
        self._load = load

    @cached_property
    def vocab(self) -> Vocab | None:
        return self._load()


def members_of(plan: MergePlan, sources: Mapping[ModelRef, Any]) -> list[Member]:
    """The step's models that have an embedding, as alignment sees them (plan order, base first);
    `sources` give each model's headers (``.info``) and its vocabulary (``.vocab()``, read lazily)."""
    out = []
    for ref in plan.referenced_models():
        info = sources[ref].info
        rows, names = vocab_tensors(info.tensors, info.arch, info.config)
        if rows is not None:
            out.append(Member(ref, info.label, rows, names, sources[ref].vocab))
    return out


def check_same_rows(plan: MergePlan, members: list[Member], donor: ModelRef) -> None:
    """Without a tokenizer setting every model must have as many embedding rows as the donor."""
    ref = next((m for m in members if m.ref == donor), members[0])
    odd = [m for m in members if m.rows != ref.rows]
    if not odd:
        return
    lines = []
    for m in odd:
        extra = ""
        if m.vocab is not None and ref.vocab is not None:
            mine, theirs = set(m.vocab.below(m.rows).ids), set(ref.vocab.below(ref.rows).ids)
            new, gone = sorted(mine - theirs, key=m.vocab.ids.get), sorted(theirs - mine, key=ref.vocab.ids.get)
            extra = f": {len(new)} token(s) not in {ref.label}" + (f" ({', '.join(map(repr, new[:5]))})" if new else "")
            extra += f", {len(gone)} of its tokens missing" if gone else ""
        lines.append(f"{m.label} has {m.rows} embedding rows, {ref.label} has {ref.rows}{extra}")
    where = f"{plan.doc.file}: " if plan.doc is not None else ""
    raise VocabularyMismatch(
        f"{where}the models' vocabularies differ:\n" + "\n".join(f"  - {line}" for line in lines) +
        "\nset tokenizer_source: union (keep every model's tokens), tokenizer_source: base (the base model's "
        "vocabulary) or tokenizer_source: MODEL, or a tokenizer: section with per-token sources, so that "
        "the embedding and lm_head rows are aligned token by token")


class Alignment:
    """The output vocabulary of a step and, for each model, which of its rows each output token takes."""

    def __init__(self, spec: TokenizerSpec, members: list[Member], base: ModelRef, vocab_of: Callable):
        self.spec = spec
        self.members = {m.ref: m for m in members}
        self.base = base
        self.settings: dict[str, TokenSetting] = dict(spec.tokens)
        self.donor, donor_vocab, full = self._donor(vocab_of)
        self.tokens = dict(donor_vocab.ids)
        added = self._extend(donor_vocab)
        self.n = max(self.tokens.values(), default=-1) + 1
        pad = spec.pad_to_multiple_of or 1
        self.size = -(-self.n // pad) * pad
        self.by_id: list[str | None] = [None] * self.n
        for t, i in self.tokens.items():
            self.by_id[i] = t
        self.perm = {m.ref: self._permutation(m) for m in members}
        # the donor's tokenizer lists tokens past its embedding rows: they are dropped from its files
        keep = self.members[self.donor].rows if full is not None and len(full) > len(donor_vocab) else None
        self.tokenizer = TokenizerOutput(None, tuple(added), keep)
        self._plans: dict[tuple, RowPlan] = {}
        self.warnings: list[str] = []

    # -- the output vocabulary ---------------------------------------------------------------
    def _vocab(self, ref: ModelRef) -> Vocab:
        m = self.members[ref]
        if m.vocab is not None:
            return m.vocab.below(m.rows)
        base = self.members[self.base]
        if base.vocab is None or m.rows != base.rows:
            raise MergeError(f"cannot align the vocabulary of {m.label}: it has no tokenizer files mergekit-lite "
                             "can read (tokenizer.json, vocab.json or vocab.txt)")
        return base.vocab.below(base.rows)  # as mergekit: assume the base model's tokenizer

    def _donor(self, vocab_of: Callable) -> tuple[ModelRef, Vocab, Vocab | None]:
        src = self.spec.source
        ref = src if isinstance(src, ModelRef) else self.base
        if ref in self.members:
            return ref, self._vocab(ref), self.members[ref].vocab
        found = vocab_of(ref)
        if found is None:
            raise MergeError(f"tokenizer source {ref} has no tokenizer files mergekit-lite can read")
        return ref, found, found

    def _extend(self, donor: Vocab) -> list[tuple[str, int, tuple]]:
        """Union tokens and the ``tokens:`` keys, appended after the donor's ids; returns them."""
        new: list[tuple[str, dict]] = []
        if self.spec.source == "union":
            usable = [self._vocab(r) for r in self.members]
            first_added: dict[str, dict] = {}
            for v in usable:
                for t in v.ordered():
                    if t in v.added and t not in first_added:
                        first_added[t] = v.added[t]
            regular = [t for v in usable for t in v.ordered() if t not in v.added]
            new += [(t, dict(ADDED_FLAGS)) for t in dict.fromkeys(regular) if t not in first_added]
            new += list(first_added.items())
        new += [(t, dict(ADDED_FLAGS)) for t, _ in self.spec.tokens]
        out = []
        next_id = max(self.tokens.values(), default=-1) + 1
        for t, flags in new:
            if t not in self.tokens:
                self.tokens[t] = next_id
                out.append((t, next_id, tuple(sorted(flags.items()))))
                next_id += 1
        return out

    def _permutation(self, m: Member) -> torch.Tensor:
        """Row of each output token in model `m` (-1 where it lacks the token). An output id no token
        has (a gap in the donor's ids) keeps row `id` of the models whose vocabulary has the same gap."""
        ids = self._vocab(m.ref).ids
        gaps = set(range(m.rows)) - set(ids.values())
        return torch.tensor([ids.get(t, -1) if t is not None else (i if i in gaps else -1)
                             for i, t in enumerate(self.by_id)], dtype=torch.long)

    def identity(self) -> bool:
        """Nothing to align: no token appended, dropped or configured, and every model has the output's
        tokens at the same ids and as many rows (padding rows past the tokens are then kept as they are)."""
        tok = self.tokenizer
        if tok.added or tok.keep_below is not None or self.settings or self.spec.pad_to_multiple_of:
            return False
        ident = torch.arange(self.n)
        return len({m.rows for m in self.members.values()}) == 1 and all(
            m.rows >= self.n and torch.equal(self.perm[r], ident) for r, m in self.members.items())

    # -- per tensor ---------------------------------------------------------------------------
    def covers(self, ref: ModelRef, tensor: str) -> bool:
        return ref in self.members and tensor in self.members[ref].names

    def aligned(self, info: SourceInfo, ref: ModelRef) -> SourceInfo:
        """`info` with its vocabulary tensors as they are after alignment (the output's row count)."""
        tensors = {name: (TensorInfo((self.size, *t.shape[1:]), t.dtype) if self.covers(ref, name) else t)
                   for name, t in info.tensors.items()}
        return SourceInfo(info.label, tensors, info.config, info.arch)

    def row_plan(self, refs: tuple[ModelRef, ...]) -> "RowPlan":
        """Where each output row of each of `refs`' tensors comes from (one plan per set of models)."""
        if refs not in self._plans:
            self._plans[refs] = plan = RowPlan.build(self, refs)
            lost = [t for t, i in self.tokens.items() if plan.unsourced[i]]
            if lost:
                self.warnings.append(
                    f"{len(lost)} token(s) of the output vocabulary ({', '.join(map(repr, lost[:5]))}) have no row in "
                    f"{', '.join(self.members[r].label for r in refs)}, the model(s) an embedding or head tensor is "
                    "made from: their rows there are zero (give them a source under tokenizer: tokens:)")
        return self._plans[refs]


class RowPlan:
    """For one merged vocabulary tensor: each input's own row per output token (-1: take the default),
    and the default rows' recipe (sums of model rows, divided by their counts). Compared by identity."""

    def __init__(self, size: int, own: list[torch.Tensor], default: torch.Tensor,
                 contrib: list[tuple[torch.Tensor, torch.Tensor]], divisor: torch.Tensor, unsourced: torch.Tensor):
        self.size = size  # output rows, padding included
        self.unsourced = unsourced  # (n,) tokens no model has and no setting gives a row: zero rows
        self.n = int(default.numel())  # output tokens
        # per model: the row each token gathers (own row, or 0 when it takes a default) and the tokens
        # that take a default with the default's index; all index tensors are made here, not at run time
        self.gather = [o.clamp(min=0) for o in own]
        self.missing = [(o < 0).nonzero().flatten() for o in own]
        self.missing_default = [default[m] for m in self.missing]
        self.contrib = contrib  # per model: (default index, row) pairs summed into the defaults
        self.divisor = divisor.view(-1, 1)  # (D, 1) count of rows summed into each default

    @classmethod
    def build(cls, al: Alignment, refs: tuple[ModelRef, ...]) -> "RowPlan":
        perms = torch.stack([al.perm[r] for r in refs])
        have = perms >= 0
        count = have.sum(0)
        forced = torch.zeros(al.n, dtype=torch.bool)
        configured: dict[int, list[tuple[int, int]]] = {}  # token id -> [(model index, row)]
        for token, setting in al.settings.items():
            t = al.tokens[token]
            forced[t] = setting.force
            if setting.source is not None and (setting.force or count[t] < len(refs)):
                configured[t] = _configured_row(al, refs, token, setting)
        needs = (count < len(refs)) | forced
        auto = needs.clone()
        auto[list(configured)] = False
        src = torch.full((al.n,), -1, dtype=torch.long)  # the one model an automatic default comes from
        single = auto & (count == 1)
        src[single] = have.long().argmax(0)[single]
        if al.base in refs:
            src[auto & (count > 1) & have[refs.index(al.base)]] = refs.index(al.base)
        average = auto & (count > 1) & (src < 0)
        unsourced = auto & (count == 0)
        default = torch.full((al.n,), -1, dtype=torch.long)
        default[needs] = torch.arange(int(needs.sum()))
        contrib = []
        for i in range(len(refs)):
            pick = (src == i) | (average & have[i])
            toks = pick.nonzero().flatten().tolist() + [t for t, rs in configured.items() for j, _ in rs if j == i]
            rows = perms[i][pick].tolist() + [r for rs in configured.values() for j, r in rs if j == i]
            contrib.append((default[torch.tensor(toks, dtype=torch.long)], torch.tensor(rows, dtype=torch.long)))
        divisor = torch.ones(int(needs.sum()))
        divisor[default[average]] = count[average].float()
        own = [torch.where(forced, -1, perms[i]) for i in range(len(refs))]
        return cls(al.size, own, default, contrib, divisor, unsourced)

    def workspace_bytes(self, row: tuple[int, ...], dtypes: list[torch.dtype]) -> int:
        """Float32 default rows, the rows gathered into them, the rows copied out of them, padding sums."""
        width = 1
        for d in row:
            width *= d
        n_def = int(self.divisor.shape[0])
        gathered = max((int(r.numel()) for _, r in self.contrib), default=0)
        filled = max((int(m.numel()) for m in self.missing), default=0)
        big = max((element_size(d) for d in dtypes), default=4)
        pad = (_CHUNK_ROWS + 2) * 4 if self.size > self.n else 0
        return width * (n_def * 4 + gathered * (big + 4) + filled * (4 + big) + pad)

    def apply(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Each input re-indexed to the output vocabulary (same dtype as the input)."""
        row = tuple(tensors[0].shape[1:])
        defaults = torch.zeros((int(self.divisor.shape[0]), *row), dtype=torch.float32)
        for x, (d, r) in zip(tensors, self.contrib):
            if r.numel():
                defaults.index_add_(0, d, x.index_select(0, r).float())
        if defaults.numel():
            defaults.view(defaults.shape[0], -1).div_(self.divisor)
        return tuple(self._one(x, i, defaults) for i, x in enumerate(tensors))

    def _one(self, x: torch.Tensor, i: int, defaults: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((self.size, *x.shape[1:]))
        torch.index_select(x, 0, self.gather[i], out=out[:self.n])
        if self.missing[i].numel():
            out.index_copy_(0, self.missing[i], defaults.index_select(0, self.missing_default[i]).to(x.dtype))
        if self.size > self.n:
            total = torch.zeros(x.shape[1:], dtype=torch.float32)
            for start in range(0, self.n, _CHUNK_ROWS):
                total += out[start:min(start + _CHUNK_ROWS, self.n)].sum(0, dtype=torch.float32)
            out[self.n:] = (total / self.n).to(x.dtype)
        return out


def _configured_row(al: Alignment, refs: tuple[ModelRef, ...], token: str, setting: TokenSetting
                    ) -> list[tuple[int, int]]:
    """The (model, row) a token's configured source names ([] for zero)."""
    s = setting.source
    if s.kind == "zero":
        return []
    if s.model not in refs:
        raise MergeError(f"token {token!r} takes its row from {s.model}, which is not merged into this tensor "
                         f"(its models: {', '.join(map(str, refs))})")
    member = al.members[s.model]
    if s.kind == "model":
        row = int(al.perm[s.model][al.tokens[token]])
        what = f"token {token!r}"
    elif s.token_id is not None:
        row, what = s.token_id, f"token id {s.token_id}"
    else:
        row, what = al._vocab(s.model).ids.get(s.token, -1), f"token {s.token!r}"
    if not 0 <= row < member.rows:
        raise MergeError(f"token {token!r} takes the row of {what} in {member.label}, which has no such row "
                         f"({member.rows} rows)")
    return [(refs.index(s.model), row)]


def align_step(plan: MergePlan, members: list[Member], vocab_of: Callable) -> Alignment | None:
    """The step's alignment, or None when none is needed (no setting and equal rows, or a setting that
    leaves every model's rows as they are)."""
    spec = plan.vocabulary
    if not members:
        return None
    base = plan.base_model if plan.base_model in {m.ref for m in members} else members[0].ref
    if spec is None:
        check_same_rows(plan, members, base)
        return None
    if all(m.vocab is None for m in members) and len({m.rows for m in members}) == 1:
        return None  # nothing to read and nothing to align: the donor's files are copied as before
    al = Alignment(spec, members, base, vocab_of)
    return None if al.identity() else al
