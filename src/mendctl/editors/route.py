"""Routed edits: each edit's ΔW acts only on inputs that name what the edit is about.

A chain of plain weight edits compounds every edit's side effects: if one MEND edit leaves
96.6 % of unrelated answers alone, a hundred leave 0.966¹⁰⁰ ≈ 3 % (docs/results.md, sequential edits).
Routing (the idea of GRACE, Hartvigsen et al. 2023, and WISE, Wang et al. 2024, applied to MEND's
low-rank deltas) keeps the deltas but gates each one per sequence: edit i's ΔW_i is added to its
layers' outputs from the first token on which the sequence *mentions the edit's subject* on.

"Mentions" is decided two ways, either of which opens the gate:
- on an early layer's hidden states (the gate layer; the edited layers come much later, so the
  gate is known before they run, in the same forward). An edit's *gate keys* are the states of
  its prompt's distinctive tokens: those unlike every token of a bank of ordinary prompts (in
  practice the subject's tokens, since the relation's wording is common to many prompts). A
  token within cosine τ of one of the keys opens the gate. Cosines are taken after
  standardising each hidden dimension by the bank's mean and spread, so the few huge "massive
  activation" dimensions do not decide them. The first token of a sequence is left out (its
  state is the attention sink's, unlike any later token's).
- on the text: an edit's *gate words* are the words of its prompt that hold a distinctive
  token, and its first word when no bank prompt starts with that token, less every word that
  occurs in the bank's prompts ("of", "The"). The gate opens once all of them have appeared,
  each as a whole word, at the token holding the character after the last (so "Oran" does not
  open on "Orange", nor "San Juan de los Morros" on "Juan Díaz"; a text that ends on the word
  has not shown its end yet).
  This catches what states miss: the subject as a sequence's first token, or tokenised
  differently ("Jamaica's capital" against "the capital of Jamaica").
A *subject* gate (`edit_gate(keys="subject")`, the workspace default) keys both on what the
prompt names instead (`subject_words`: "France", not the relation's "president", which is what
the distinct tokens are when the bank knows the subject): its words are the names, and its
state keys the names' tokens that are distinct from the bank, where there are at least three
(`min_keys`: a short name's one or two tokens look like a token of other names, "Sampo" like
"Limpopo"; such a gate opens by its words alone). Such a gate made with `every`
(`all_keys` in the settings) opens by states only once each of its keys has been matched by
some token, not one of them: a name that shares a first name or a syllable with an edited one
("Alfred G. Gilman" for "Alfred Kastler", "Kočevje" for "Kozje") leaves the edit shut.
A subject gate made with `aliases` also opens on other names of what it reads, each matched
as its words are (`Gate.aliases`, editors/aliases.py: "the Indian prime minister" for "India's
PM"; a one-word alias not where it starts a longer name, "the Indian Ocean").
Of a subject's several edits (gates reading the same names, made with `select`), one acts at
a token: the one whose *relation keys* (the states of its prompt's other tokens) the text so
far best matches, by BERTScore's idf-weighted F-measure of a soft token alignment
(`select_open`). Without that, every edit of a subject acts on every question about it, and
a later fact overwrites the earlier ones. An edit's own prompt holds its whole relation, and
it wins there; on a tie the later edit wins, so an edit of the same wording replaces the
earlier fact.
Once open, a gate stays open to the end of the sequence (causal: a token only sees what came
before it, so scoring a prompt and generating from it see the same gates), or, for a gate with
an `until` text (the edit's target), until that text has been written after the gate opened:
from the token holding its last character on, the edit no longer acts. Without that, an edit
whose answer is on the page keeps acting on its own output and writes its target again and
again ("PSGGGG", a name three times); with it, the answer reads as the target followed by
what the base model would say next. Scoring the target by teacher forcing is unchanged: every
target token is predicted from a position before the target's last token. When the caller
says where the generated answer starts (`answering`, as mendctl's own generation does), such
a gate also closes as soon as the answer leaves the target's path ("the" where "PSG" was
meant): the edit then gives way to the base model instead of pushing its target's tokens into
an answer that took another turn. And an answer that takes the edit writes the whole target,
not a mix of its pieces: where the answer has begun the target ("Matteo" of "Matteo Salvini")
and the edited model's next token would leave it ("Matteoessorsi": the edit's pull spread
over the target's tokens), or where the answer's first word would be a later piece of the
target (" K" of "New York Knicks"), the best-scoring of the 32 best tokens that stays
on the target's path is written (`finish_token`, on the model's logits). Teacher-forced
scores never see this (they say nowhere where an answer starts): it changes what is
generated, not what is measured as edit or paraphrase success.

This module owns the gate space (bank statistics), gate keys, and the forward hooks that apply
gated deltas. Gates read whole sequences: a forward with a KV cache is followed only from the
forward that filled it (whose tokens and gate-layer states the hooks keep), and batches must
not be left-padded. It knows nothing about ledgers.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .aliases import alternatives, titled
from .delta import Delta
from .forward import states_after
from .text import encode_prompts, render_prompt
from .weights import _BLOCK, input_device

#: defaults chosen on the validation split (bench/routed.py; docs/results.md, routed edits)
GATE_LAYER = 3
DISTINCT = 0.7
TAU = 0.7

_WORD = re.compile(r"\w+")


def block_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is hidden state `layer` (1-based: after `layer` blocks)."""
    for name in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        try:
            return model.get_submodule(name)[layer - 1]
        except AttributeError:
            continue
    raise ValueError("cannot find the model's list of transformer blocks to place a gate on")


@torch.no_grad()
def hidden_at(model: nn.Module, tokenizer, prompts: list[str], layer: int, fmt: str = "raw",
              chunk: int = 32) -> list[torch.Tensor]:
    """Per prompt: (tokens − 1, hidden) fp32 states after `layer` blocks, the first token left
    out (a BOS token where the tokenizer adds one, else the first word; either way its state
    carries the model's attention-sink activations, unlike any later token's)."""
    out, block = [], block_module(model, layer)
    for i in range(0, len(prompts), chunk):
        b = encode_prompts(tokenizer, prompts[i:i + chunk], fmt).to(input_device(model))
        h = states_after(model, block, b.input_ids, b.attention_mask)[0]
        for j in range(b.input_ids.shape[0]):
            n = int(b.attention_mask[j].sum())
            out.append(h[j, 1:n].float().cpu())
    return out


@dataclass
class GateSpace:
    """Standardisation and the bank of ordinary token states at one layer."""

    layer: int
    mean: torch.Tensor  # (hidden,)
    std: torch.Tensor  # (hidden,)
    bank: torch.Tensor  # (n, hidden), unit rows after standardising
    first_ids: frozenset  # token ids that start some bank prompt
    words: frozenset  # every word of the bank prompts: ordinary words, never gate words
    # per token id, the number of bank prompts holding it (after their first token), and the
    # number of prompts: how common a token is in ordinary prompts (`idf`). None: a space
    # saved before them (`token_frequencies` makes them from the bank again)
    df: torch.Tensor | None = None
    docs: int = 0

    def unit(self, h: torch.Tensor) -> torch.Tensor:
        z = (h.float() - self.mean.to(h.device)) / self.std.to(h.device)
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def idf(self, ids: torch.Tensor) -> torch.Tensor:
        """The inverse document frequency log((prompts + 1) / (prompts holding it + 1)) of
        each token id in `ids` (any shape), as BERTScore weighs tokens: "of", "is", "?" count
        little, "minister" and "currency" much. Uniform (1) without frequencies."""
        if self.df is None:
            return torch.ones(ids.shape)
        ids = ids.cpu().long()
        known = ids < len(self.df)
        count = torch.where(known, self.df[ids.clamp_max(len(self.df) - 1)], 0).float()
        return torch.log((self.docs + 1) / (count + 1))

    def save(self, path) -> None:
        """One safetensors file: the tensors, and the layer, first ids and words as metadata."""
        extra = {"df": self.df.contiguous()} if self.df is not None else {}
        save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous(),
                   "bank": self.bank.contiguous(), **extra}, str(path),
                  metadata={"layer": str(self.layer), "first_ids": json.dumps(sorted(self.first_ids)),
                            "words": json.dumps(sorted(self.words)), "docs": str(self.docs)})

    @classmethod
    def load(cls, path) -> "GateSpace":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(int(meta["layer"]), t["mean"], t["std"], t["bank"],
                   frozenset(json.loads(meta["first_ids"])), frozenset(json.loads(meta["words"])),
                   t.get("df"), int(meta.get("docs", 0)))


def token_frequencies(tokenizer, texts: list[str]) -> tuple[torch.Tensor, int]:
    """(per token id the number of `texts` holding it after their first token, len(texts))."""
    seen: dict[int, int] = {}
    for t in texts:
        for i in set(tokenizer(t).input_ids[1:]):
            seen[i] = seen.get(i, 0) + 1
    df = torch.zeros(max(seen, default=-1) + 1, dtype=torch.long)
    if seen:
        df[torch.tensor(list(seen))] = torch.tensor(list(seen.values()))
    return df, len(texts)


def gate_space(model: nn.Module, tokenizer, prompts: list[str], layer: int = GATE_LAYER,
               fmt: str = "raw") -> GateSpace:
    """The gate space of ordinary `prompts` (say, the train split's: none of them is edited)."""
    h = torch.cat(hidden_at(model, tokenizer, prompts, layer, fmt))
    mean, std = h.mean(0), h.std(0).clamp_min(1e-6)
    texts = [render_prompt(tokenizer, p, fmt) for p in prompts]
    first = frozenset(tokenizer(t).input_ids[0] for t in texts)
    words = frozenset(w for t in texts for w in _WORD.findall(t))
    space = GateSpace(layer, mean, std, torch.empty(0), first, words,
                      *token_frequencies(tokenizer, texts))
    space.bank = space.unit(h)
    return space


@dataclass
class Gate:
    """What opens one edit's gate: states near `keys`, or all of `words` in the text (in any
    case with `fold`); and what closes it: `until`, the edit's target, once written after the opening (None: never)."""

    keys: torch.Tensor  # (k, hidden) unit keys
    words: tuple[str, ...] = ()
    until: str | None = None
    fold: bool = False  # the words match in any case (a name that opened its prompt)
    # by states, the gate opens once every key has been matched by some token so far, not
    # one of them: a name's every distinct token, so "Alfred G. Gilman" does not open the
    # edit of "Alfred Kastler", nor "Schrock" that of "Schoeman"
    every: bool = False
    # (unit states, like `keys`) the prompt's tokens beside the names its gate reads: how it
    # words the relation. Of several open gates that read the same names, only the one whose
    # relation best matches the text so far stays open (`select`)
    relation: torch.Tensor | None = None
    relation_weight: torch.Tensor | None = None  # (k,) each relation key's `GateSpace.idf`
    # other word sets that open the gate as `words` do: other names of what it reads ("Indian"
    # for "India", editors/aliases.py), each matched the same way (all its words, whole)
    aliases: tuple[tuple[str, ...], ...] = ()


#: most of a prompt's own words a one-word alias may be followed by as a title (`titled`)
MAX_TITLES = 4

#: Capitalised words that are part of how a question or instruction is put, never its subject
#: (most are also caught by the bank's lowercase words; these are the ones a bank of statements
#: may lack).
_NOT_NAMES = frozenset("who whom whose what which where when why how tell name list give say "
                       "describe explain is are was were do does did the a an in on of".split())


def subject_words(prompt: str, space: GateSpace) -> tuple[str, ...]:
    """The words of `prompt` that name something: the words with a capital letter or a digit
    whose lowercase form no bank prompt uses as an ordinary word ("India", "Camp", "Nou",
    "iPhone", "1969"; not "Who", "The", "People" or "President" where the bank has
    "president"), longer than one character (not "Q", "A", "I").

    Names next to each other (only spaces between) are one name. Where the prompt has several,
    a lone acronym goes ("India's PM" is also "the prime minister of India": beside a name an
    acronym is mostly the relation's; "APA Corporation" keeps it), and so does a lone word
    that opens the prompt ("Geographers place Guatemala in": sentence case capitalises it
    either way); alone, each is the subject ("MQL", "Hamlet was written by")."""
    ordinary = {w for w in space.words if w.islower()}
    runs: list[list[re.Match]] = []
    for m in _WORD.finditer(prompt):
        w = m.group()
        if not (len(w) > 1 and any(ch.isupper() or ch.isdigit() for ch in w)
                and w.lower() not in ordinary and w.lower() not in _NOT_NAMES):
            continue
        if runs and not prompt[runs[-1][-1].end():m.start()].strip():
            runs[-1].append(m)
        else:
            runs.append([m])
    first = _WORD.search(prompt)

    def minor(run):
        return len(run) == 1 and (run[0].group().isupper() or run[0].start() == first.start())

    kept = [r for r in runs if not minor(r)] or runs
    out = []
    for m in (m for r in kept for m in r):
        if m.group() not in out:
            out.append(m.group())
    return tuple(out)


def subject_in(prompt: str, subject: str | None) -> tuple[str, ...]:
    """The words of `subject` as `prompt` writes them, where the prompt names it (whole words,
    any case; the first occurrence), else ()."""
    if not subject or not subject.strip():
        return ()
    m = re.search(rf"(?<!\w){re.escape(subject.strip())}(?!\w)", prompt, re.IGNORECASE)
    return tuple(dict.fromkeys(w.group() for w in _WORD.finditer(m.group()))) if m else ()


def edit_gate(model: nn.Module, tokenizer, space: GateSpace, prompt: str, fmt: str = "raw",
              distinct: float = DISTINCT, keys: str = "distinct", every: bool = False,
              subject: str | None = None, select: bool = False, min_keys: int = 0,
              aliases: bool = False) -> Gate:
    """An edit's gate (see the module doc).

    `keys="distinct"` (entries made before `subject` keys): the prompt's tokens whose nearest
    bank token is less than `distinct` alike (at least the one least like the bank, so every
    edit has a key), and the words holding them, less the bank's words. Where the subject is a
    word the bank knows ("India", "France") and the relation's words are not ("prime",
    "minister"), such a gate keys on the relation: it opens on every prime minister's question
    and on none of India's that words it otherwise.

    `keys="subject"`: the gate keys on what the prompt names (`subject_words`): its words are
    those names, all of which must appear, and its state keys are the names' tokens that are
    distinct from the bank (none for a name the bank knows: its word opens the gate). A prompt
    that names nothing (no such word) gets the distinct-token gate. A `subject` the request
    gives (a data file's `subject`, `edit --subject`) that the prompt writes is the name
    instead: "penicillin", which no capital marks, or "James Chadwick" alone where the prompt
    also says "Nobel"; written in lowercase, its words match in any case.

    `every` (a subject gate only): the states open the gate once every key has been matched
    (`Gate.every`). A distinct-token gate keeps the one-key rule: its keys are whatever
    tokens of the prompt are rare, often the relation's ("symbol", "element" beside a
    lowercase "iodine"), which a rephrasing need not repeat.

    `select` (a gate reading names only): the gate also keeps its prompt's other tokens as the
    relation's wording (`Gate.relation`), so that of a subject's several edits only the one
    asked about acts (`gates`).

    `min_keys` (a gate reading names only): a gate with fewer state keys than this keeps none,
    and opens by its names' words alone, where they open it on its own prompt. A short name's
    one or two distinct tokens look like a token of other names ("Sampo" like "Limpopo",
    "Jim Davis" like "Jim Farley", "Hy" like "Hyodo"); a longer name's every key is matched
    only by that name.

    `aliases` (a gate reading names only): the other names of what it reads open it too
    (`Gate.aliases`, from `editors.aliases.alternatives`: "the Indian PM" for "India's PM"),
    and a one-word alias followed by the prompt's own words as a title (`titled`: "the French
    President" for "Who is the president of France?")."""
    text = render_prompt(tokenizer, prompt, fmt)
    enc = tokenizer(text, return_offsets_mapping=True)
    z = space.unit(hidden_at(model, tokenizer, [prompt], space.layer, fmt)[0])
    near = (z @ space.bank.T).max(1).values
    offsets = enc["offset_mapping"][1:]  # (hidden_at leaves the first token out)
    given = subject_in(prompt, subject) if keys == "subject" else ()
    names = given or (subject_words(prompt, space) if keys == "subject" else ())
    if names:
        at = text.rfind(prompt)  # (the prompt inside the rendered text: a chat template)
        spans = [(at + m.start(), at + m.end()) for m in _WORD.finditer(prompt) if m.group() in names]
        on_name = torch.tensor([any(a < e and b > s_ for s_, e in spans) for a, b in offsets],
                               dtype=torch.bool)
        # a name that opens the prompt may be capitalised only for that ("Silver's symbol
        # is" / "the symbol of silver"): such a gate's words match in any case
        head = _WORD.search(prompt).group()
        fold = (head in names and head[:1].isupper() and head[1:].islower()) or (
            bool(given) and all(w.islower() for w in given))
        ids = torch.tensor(enc["input_ids"][1:])
        keys_ = z[on_name & (near < distinct)]
        if len(keys_) < min_keys and bool(word_gates(
                tokenizer, torch.tensor([enc["input_ids"]]), WordIndex([names], [fold]))[0, -1, 0]):
            # (only where the words open it by the prompt's last token: not where the prompt
            # ends on the name, nor where a letter's bytes fall in two tokens and the text
            # read back from the tokens does not spell the name)
            keys_ = keys_[:0]
        others = ()
        if aliases:
            others = alternatives(names)
            # the prompt's own words for what it asks (long lowercase words, not how a question
            # is put: "president", "capital"), which may follow a demonym as a title
            relation = list(dict.fromkeys(w for w in _WORD.findall(prompt) if w.islower()
                                          and len(w) >= 4 and w not in _NOT_NAMES))[:MAX_TITLES]
            others += titled(others, relation)
        return Gate(keys_.contiguous(), names, fold=fold, every=every,
                    relation=z[~on_name].contiguous() if select else None,
                    relation_weight=space.idf(ids[~on_name]).contiguous() if select else None,
                    aliases=others)
    keep = near < distinct
    if not keep.any():
        keep = near == near.min()
    keys_ = z[keep].contiguous()
    spans = [span for span, k in zip(offsets, keep.tolist()) if k]
    if enc["input_ids"][0] not in space.first_ids:
        spans.append(enc["offset_mapping"][0])  # a first token no ordinary prompt starts with
    words = []
    for m in _WORD.finditer(text):
        w = m.group()
        if any(a < m.end() and b > m.start() for a, b in spans) and w not in space.words and w not in words:
            words.append(w)
    return Gate(keys_, tuple(words))


def gate_keys(model: nn.Module, tokenizer, space: GateSpace, prompt: str, fmt: str = "raw",
              distinct: float = DISTINCT) -> torch.Tensor:
    """The state keys of `edit_gate` alone."""
    return edit_gate(model, tokenizer, space, prompt, fmt, distinct).keys


class WordIndex:
    """The gate words of many edits, indexed by word: a text is read once, for its complete
    words, and only the edits whose words it holds are looked at (a chain of a thousand
    routed edits is not a thousand pattern searches per sequence per forward)."""

    def __init__(self, words: list[tuple[str, ...]], folds: list[bool] | None = None,
                 aliases: list[tuple[tuple[str, ...], ...]] | None = None):
        self.words = [tuple(ws) for ws in words]
        # (an edit whose words match in any case, `Gate.fold`, is indexed by lowercase word)
        self.folds = list(folds) if folds is not None else [False] * len(self.words)
        # every word set that opens an edit (its words, then its aliases), with its edit
        self.sets: list[tuple[str, ...]] = []
        self.owner: list[int] = []
        self.lone: set[int] = set()  # the sets that are one alias word: they must stand alone
        self.by_word: dict[str, list[int]] = {}
        self.by_lower: dict[str, list[int]] = {}
        for i, (ws, fold) in enumerate(zip(self.words, self.folds)):
            own = [(False, ws)] if ws else []
            for alias, alt in own + [(True, a) for a in (aliases[i] if aliases else ())]:
                k = len(self.sets)
                self.sets.append(tuple(alt))
                self.owner.append(i)
                if alias and len(alt) == 1:
                    self.lone.add(k)
                for w in set(alt):
                    # (aliases match as written, even where the gate's own words match in any
                    # case: a name capitalised only because it opens the prompt has no alias)
                    if fold and not alias:
                        self.by_lower.setdefault(w.lower(), []).append(k)
                    else:
                        self.by_word.setdefault(w, []).append(k)

    @classmethod
    def of_gates(cls, gates_: list["Gate"]) -> "WordIndex":
        """The index of `gates_`' words and aliases."""
        return cls([g.words for g in gates_], [g.fold for g in gates_], [g.aliases for g in gates_])

    def opened(self, text: str) -> dict[int, int]:
        """{edit: the offset just past the last of its words' first whole occurrences} for
        the edits all of whose words (or one of whose alias sets) `text` holds. A whole
        occurrence is a maximal run of word characters with a character after it (seen), so
        "Oran" is not in "Orange", and a text that ends on a word has not shown its end yet.
        A one-word alias counts only where it is not a longer name's first word (`_on_its_own`):
        "Indian" opens India's edits in "the Indian prime minister", not in "the Indian Ocean"."""
        found = list(_WORD.finditer(text))
        # per key: (first end of a whole occurrence, first offset where it stands on its own)
        first_end: dict[str, int] = {}
        first_lower: dict[str, int] = {}
        free_end: dict[str, int] = {}
        free_lower: dict[str, int] = {}
        for j, m in enumerate(found):
            if m.end() < len(text):
                for w, index, first, free in ((m.group(), self.by_word, first_end, free_end),
                                              (m.group().lower(), self.by_lower, first_lower, free_lower)):
                    if w in index:
                        first.setdefault(w, m.end())
                        if w not in free and any(k in self.lone for k in index[w]):
                            at = _on_its_own(text, found, j)
                            if at is not None:
                                free[w] = at
        out: dict[int, int] = {}
        for seen, free, index, key in ((first_end, free_end, self.by_word, str),
                                       (first_lower, free_lower, self.by_lower, str.lower)):
            done = set()
            for w in seen:
                for k in index[w]:
                    have = free if k in self.lone else seen
                    if k not in done and all(key(x) in have for x in self.sets[k]):
                        done.add(k)
                        at, i = max(have[key(x)] for x in self.sets[k]), self.owner[k]
                        out[i] = min(out.get(i, at), at)  # (the first of its word sets seen)
        return out


def _on_its_own(text: str, found: list[re.Match], j: int) -> int | None:
    """Where word `found[j]` of `text` is known to stand on its own, not as the first word of
    a longer name ("Indian" in "Indian Ocean", "British" in "British Museum"), from the text up
    to there only (gates are causal): the offset of what follows it where that is punctuation,
    or a word in lowercase or a digit ("Indian prime", "Indian, "); past the next word where
    that is an acronym ("Indian PM"); None where the next word is capitalised ("Indian Ocean"),
    or where what follows is not yet written."""
    m = found[j]
    rest = text[m.end():]
    at = m.end() + len(rest) - len(rest.lstrip())  # the first character after the spaces
    if at >= len(text):
        return None
    nxt = found[j + 1] if j + 1 < len(found) else None
    if nxt is None or nxt.start() > at or not text[at].isupper():
        return at
    if nxt.end() >= len(text):
        return None  # (a capital: a name's next word, or an acronym? not yet whole)
    return nxt.end() if nxt.group().isupper() else None


def token_texts(tokenizer, input_ids: torch.Tensor, cache: dict | None = None
                ) -> list[tuple[str, list[int]]]:
    """Per row of `input_ids`: its text and, per token, the offset just past that token's
    characters. Token t's text is what decoding it after token t − 1 adds (so the spaces a
    decoder puts between tokens are kept), cached per pair in `cache`."""
    cache = {} if cache is None else cache
    out = []
    for row in input_ids.tolist():
        pieces = [token_piece(tokenizer, row[i - 1] if i else None, t, cache)
                  for i, t in enumerate(row)]
        ends, n = [], 0
        for piece in pieces:
            n += len(piece)
            ends.append(n)
        out.append(("".join(pieces), ends))
    return out


def token_piece(tokenizer, prev: int | None, t: int, cache: dict) -> str:
    """The text token `t` adds after token `prev` (None: at the start), cached in `cache`."""
    if (prev, t) not in cache:
        if prev is None:
            cache[(prev, t)] = tokenizer.decode([t])
        else:
            alone, both = tokenizer.decode([prev]), tokenizer.decode([prev, t])
            cache[(prev, t)] = both[len(alone):] if both.startswith(alone) else tokenizer.decode([t])
    return cache[(prev, t)]


def word_gates(tokenizer, input_ids: torch.Tensor, words: list[tuple[str, ...]] | WordIndex,
               cache: dict | None = None, texts: list | None = None) -> torch.Tensor:
    """(batch, tokens, edits) bool: has the text up to each token held all of each edit's
    `words`, each as a whole word (the character after it seen, so "Oran" does not open on
    "Orange": the gate opens one token after the word's last)? `texts`: `token_texts` of
    the ids, if already made; `words` may come indexed (`WordIndex`)."""
    index = words if isinstance(words, WordIndex) else WordIndex(words)
    texts = token_texts(tokenizer, input_ids, cache) if texts is None else texts
    out = torch.zeros(*input_ids.shape, len(index.words), dtype=torch.bool)
    for b, (text, ends) in enumerate(texts):
        for i, last in index.opened(text).items():  # open at the token holding the character
            first = next(t for t, e in enumerate(ends) if e > last)  # after the last word
            out[b, max(first, 1):, i] = True  # the first token never opens a gate
    return out


@dataclass
class RoutedEdit:
    """One edit as routing applies it: its delta (low-rank) and its gate."""

    delta: Delta
    gate: Gate


#: Per row of the next forward passes: the number of prompt tokens (where the generated answer
#: starts), set by a generation loop with `answering`; None: not generating.
_ANSWER_STARTS: ContextVar[list[int] | None] = ContextVar("mendctl_answer_starts", default=None)


@contextmanager
def answering(starts: list[int]):
    """Forward passes inside the block run rows whose first `starts[b]` tokens are the prompt
    and the rest generated answer (see the module doc: gates with a target close when the
    answer leaves it)."""
    token = _ANSWER_STARTS.set(list(starts))
    try:
        yield
    finally:
        _ANSWER_STARTS.reset(token)


def mark_answer_starts(starts: list[int] | None) -> None:
    """Set, until changed, where the answers of the next forward passes start: for a forward
    hook that follows a generation loop it does not own (mendctl.deploy), where `answering`
    cannot wrap the calls."""
    _ANSWER_STARTS.set(None if starts is None else list(starts))


def off_target(opened: torch.Tensor, texts: list[tuple[str, list[int]]], until: list[str | None],
               starts: list[int]) -> torch.Tensor:
    """`opened` with each target-closing gate shut on the generated tokens from the first at
    which the answer so far (text after the prompt's `starts[b]` tokens, leading space aside)
    is not a proper prefix of the target: it took another turn, or the target is complete."""
    out = opened.clone()
    for i in opened.any(dim=1).any(dim=0).nonzero().flatten().tolist():
        target = (until[i] or "").strip()
        if not target:
            continue
        for b, (text, ends) in enumerate(texts):
            s = starts[b]
            if not 0 < s < len(ends):
                continue
            begin = ends[s - 1]
            for p in range(s, len(ends)):
                answer = text[begin:ends[p]].lstrip()
                if not (len(answer) < len(target) and target.startswith(answer)):
                    out[b, p:, i] = False
                    break
    return out


def target_answers(opened: torch.Tensor, texts: list[tuple[str, list[int]]],
                   until: list[str | None], starts: list[int]) -> list[tuple[int, int, str]]:
    """(row, edit, answer so far) where the row's last token predicts an answer token (it is
    the prompt's last or an answer's) and a target-closing gate is open there (after
    `off_target`: the answer so far, spaces aside, is a proper prefix of the target)."""
    out = []
    for b, (text, ends) in enumerate(texts):
        s = starts[b]
        if not 0 < s <= len(ends):
            continue
        answer = text[ends[s - 1]:]
        out += [(b, i, answer) for i in opened[b, -1].nonzero().flatten().tolist() if until[i]]
    return out


def _on_path(answer: str, piece: str, target: str) -> bool:
    """Does `piece` after `answer` keep it a prefix of `target` (or complete it), adding to it?"""
    done, grown = answer.lstrip(), (answer + piece).lstrip()
    return len(grown) > len(done) and (target.startswith(grown) or grown.startswith(target))


def stray_piece(piece: str, target: str, word_start: bool) -> bool:
    """Is `piece` (a token's text) a later part of one of `target`'s names, written where the
    answer should begin: the edit's pull on its target's tokens spread, so one from its middle
    came first (" K" of "New York Knicks", " Su" of "Lisa Su", "elt" of "Boston Celtics")?
    A piece that starts a word (`word_start`: it or the text before it has the space) counts
    where it starts a later word of the target and holds a capital or a digit (never " a" or
    " the"); a piece glued to the text before it, where it lies inside one of the target's
    words and is two characters or more."""
    p = piece.strip()
    if not p:
        return False
    if word_start:
        return (any(c.isupper() or c.isdigit() for c in p)
                and any(target[i - 1].isspace() for i in _occurrences(target, p)))
    return len(p) >= 2 and any(target[i - 1].isalnum() for i in _occurrences(target, p))


def _occurrences(text: str, part: str) -> list[int]:
    """Where `part` occurs in `text` after its first character."""
    out, i = [], text.find(part, 1)
    while i > 0:
        out.append(i)
        i = text.find(part, i + 1)
    return out


def finish_token(tokenizer, cache: dict, last: int, answer: str, target: str,
                 scores: torch.Tensor, k: int = 32) -> int | None:
    """The token that keeps an answer on its edit's `target` (`answer`: its text so far;
    `last`: its last token), or None to leave the model's own: where the answer has begun the
    target and the best-scoring token would leave it ("Matteo" + "essorsi"), or where nothing
    but spaces is written and the best token is a later piece of it (`stray_piece`), the
    best of the `k` best-scoring tokens that stays on the target's path."""
    target = target.strip()
    best = scores.topk(min(k, scores.numel())).indices.tolist()
    first = token_piece(tokenizer, last, best[0], cache)
    if _on_path(answer, first, target):
        return None  # (the model's own token already is)
    word_start = first[:1].isspace() or answer[-1:].isspace()
    if not answer.strip() and not stray_piece(first, target, word_start):
        return None  # an answer that does not take the edit: the model's own
    return next((t for t in best[1:] if _on_path(answer, token_piece(tokenizer, last, t, cache),
                                                     target)), None)


def close_after(opened: torch.Tensor, texts: list[tuple[str, list[int]]],
                until: list[str | None]) -> torch.Tensor:
    """`opened` (batch, tokens, edits) with each edit whose `until` text is written after its
    gate opened closed again from the token holding that text's last character on."""
    out = opened.clone()
    for i in opened.any(dim=1).any(dim=0).nonzero().flatten().tolist():  # gates open somewhere
        target = (until[i] or "").strip()
        if not target:
            continue
        for b, (text, ends) in enumerate(texts):
            where = opened[b, :, i].nonzero()
            if not len(where):
                continue
            first = int(where[0])
            start = ends[first - 1] if first else 0  # the opening token's first character
            at = text.find(target, start)
            if at < 0:
                continue
            last = at + len(target) - 1
            t_end = next(t for t, e in enumerate(ends) if e > last)
            out[b, t_end:, i] = False
    return out


@dataclass
class KeyTable:
    """Many gates' keys stacked once, with the gate each key belongs to and each gate's rule
    (`Gate.every`): the hooks of a chain of a thousand routed edits do not stack them again on
    every forward."""

    keys: torch.Tensor  # (all keys, dim)
    owner: torch.Tensor  # (all keys,) the gate of each
    n: int  # gates
    every: torch.Tensor | None = None  # (gates,) bool: opened by all its keys, not one
    # the gates that read the same names and carry their relation's wording (`Gate.relation`),
    # in groups of two or more, with those relation keys: of a group, one gate stays open
    groups: tuple[tuple[int, ...], ...] = ()
    relations: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    @classmethod
    def of(cls, keys: list[torch.Tensor], every: list[bool] | None = None) -> "KeyTable":
        owner = torch.cat([torch.full((len(x),), i) for i, x in enumerate(keys)]) if keys \
            else torch.zeros(0, dtype=torch.long)
        rule = torch.tensor(every, dtype=torch.bool) if every is not None and any(every) else None
        return cls(torch.cat(keys) if keys else torch.zeros(0, 0), owner, len(keys), rule)

    @classmethod
    def of_gates(cls, gates_: list["Gate"]) -> "KeyTable":
        table = cls.of([g.keys for g in gates_], [g.every for g in gates_])
        # gates that share a way of writing their names are one subject's (`same_names`),
        # and so, through them, are their other ways: group them (union-find)
        parent: dict[int, int] = {}
        first: dict[tuple, int] = {}

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        for i, g in enumerate(gates_):
            if g.relation is not None and g.words:
                parent[i] = i
                for name in name_sets(g):
                    if name in first:
                        parent[root(i)] = root(first[name])
                    else:
                        first[name] = i
        by_root: dict[int, list[int]] = {}
        for i in parent:  # (in gate order: on a tie the later gate wins)
            by_root.setdefault(root(i), []).append(i)
        table.groups = tuple(tuple(ix) for ix in by_root.values() if len(ix) > 1)
        table.relations = {i: (gates_[i].relation, gates_[i].relation_weight)
                           for ix in table.groups for i in ix}
        return table


def name_sets(gate: Gate) -> frozenset[tuple[str, ...]]:
    """Every way `gate` knows of writing the names it reads, in any case (a prompt that opens
    with the name capitalises it, `Gate.fold`, and another about the same subject may not):
    its words and its aliases."""
    return frozenset(tuple(w.lower() for w in ws) for ws in (gate.words,) + gate.aliases if ws)


def same_names(a: Gate, b: Gate) -> bool:
    """Do gates `a` and `b` read the same subject: one way of writing its names in common
    ("India" with aliases "Indian", …, and "Indian" with "India", …; or the same words)?"""
    return bool(name_sets(a) & name_sets(b))


def relation_match(z: torch.Tensor, relation: torch.Tensor, weight: torch.Tensor | None = None,
                   token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens): how well the text up to each token words the relation whose token
    states are `relation` (k, dim), both unit: the F-measure of a soft token alignment
    (BERTScore's), from how much of the relation's wording the text holds so far (each
    relation token's best cosine to a token so far, weighted by `weight`, (k,)) and how much
    of the text so far is that wording (each token's best cosine to a relation token, weighted
    by `token_weight`, (batch, tokens)), cosines below 0 counted as 0. BERTScore weighs both
    by idf (`GateSpace.idf`), so that "is", "the" and "?" do not decide which of a subject's
    questions a text asks. The first token is left out (the attention sink, as for the keys)."""
    if not len(relation):
        return torch.zeros(z.shape[:2], device=z.device)
    w = torch.ones(len(relation)) if weight is None else weight
    w = w.to(z.device) / w.sum().clamp_min(1e-12)
    tw = torch.ones(z.shape[:2]) if token_weight is None else token_weight
    tw = tw.to(z.device).float().clone()
    tw[:, 0] = 0
    sim = (z @ relation.to(z.device).T).clamp_min(0)  # (B, T, k)
    sim[:, 0] = 0
    held = sim.cummax(dim=1).values @ w
    share = (sim.max(-1).values * tw).cumsum(1) / tw.cumsum(1).clamp_min(1e-12)
    return 2 * held * share / (held + share).clamp_min(1e-6)


def select_open(z: torch.Tensor, table: KeyTable, opened: torch.Tensor,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`opened` with, of each group of gates that read the same names (`KeyTable.groups`),
    only the open one whose relation the text best matches (`relation_match`; `token_weight`
    (batch, tokens): the text's tokens' idf) kept open at each token: of a subject's edits,
    the one the text asks about. On a tie the later gate wins (an edit of the same wording
    replaced the earlier fact)."""
    if not table.groups:
        return opened
    open_anywhere = opened.any(1).any(0).tolist()
    for group in table.groups:
        ix = [i for i in group if open_anywhere[i]]
        if len(ix) < 2:
            continue
        score = torch.stack([relation_match(z, *table.relations[i], token_weight) for i in ix], -1)
        score = score.masked_fill(~opened[..., ix], -torch.inf)
        best = len(ix) - 1 - score.flip(-1).argmax(-1)  # (the last of the best)
        keep = torch.nn.functional.one_hot(best, len(ix)).bool()
        opened[..., ix] = opened[..., ix] & keep
    return opened


def gates(space: GateSpace, hidden: torch.Tensor, keys: list[torch.Tensor] | KeyTable, tau: float,
          words: torch.Tensor | None = None, margin: float | None = None,
          select: bool = True, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens, edits) bool: is each edit's gate open at each token of `hidden`
    (batch, tokens, dim), the states at the gate layer?

    An edit's score at a token is the best cosine of any token so far to one of its keys (for
    a gate whose every key must be matched, `Gate.every`: the worst over its keys of that best
    cosine), or 1 (a key's own cosine) once `words` (batch, tokens, edits; see `word_gates`)
    holds. A gate is
    open where its score exceeds `tau` and, with a `margin`, is within `margin` of the best
    score of any edit there: a sequence that names one subject then opens that subject's edits
    (all of them: they score alike), not those of a similar-looking name that also passed τ.
    With `select`, of the gates that read the same names and carry their relation's wording,
    one stays open (`select_open`; `token_weight`: the tokens' idf)."""
    table = keys if isinstance(keys, KeyTable) else KeyTable.of(keys)
    z = space.unit(hidden)
    k, owner = table.keys.to(z.device), table.owner.to(z.device)
    sim = z @ k.T  # (B, T, total keys)
    sim[:, 0] = -torch.inf  # the first token never opens a gate (see hidden_at)
    seen = sim.cummax(dim=1).values  # each key's best cosine so far
    shape, index = (*sim.shape[:2], table.n), owner.expand(*sim.shape[:2], -1)
    best = torch.full(shape, -torch.inf, device=z.device, dtype=sim.dtype)
    score = best.scatter_reduce(2, index, seen, "amax")  # the gate's best of them
    if table.every is not None:  # the gate's worst of them
        worst = torch.full(shape, torch.inf, device=z.device, dtype=sim.dtype)
        worst = worst.scatter_reduce(2, index, seen, "amin")
        worst = worst.masked_fill(~torch.isfinite(worst), -torch.inf)  # (a gate without keys)
        score = torch.where(table.every.to(z.device), worst, score)
    opened = score > tau
    if words is not None:  # (the words open a gate whatever τ is)
        words = words.to(score.device)
        score = torch.where(words, score.clamp_min(1.0), score)
        opened |= words
    if margin is not None:
        opened &= score >= score.max(dim=-1, keepdim=True).values - margin
    return select_open(z, table, opened, token_weight) if select else opened


def open_at_end(model: nn.Module, tokenizer, space: GateSpace, gates_: list[Gate],
                prompts: list[str], tau: float = TAU, fmt: str = "raw",
                margin: float | None = None, select: bool = True) -> torch.Tensor:
    """(prompts, gates) bool: which gates are open at each prompt's last token (where its
    answer is predicted); without `select`, every gate of a subject that opens, not only the
    one chosen (`select_open`)."""
    keys = KeyTable.of_gates(gates_)
    index = WordIndex.of_gates(gates_) if any(g.words for g in gates_) else None
    out = torch.zeros(len(prompts), len(gates_), dtype=torch.bool)
    for i, (p, h) in enumerate(zip(prompts, hidden_at(model, tokenizer, prompts, space.layer, fmt))):
        full = torch.cat([torch.zeros(1, h.shape[1]), h])[None]  # hidden_at drops token 0
        ids = torch.tensor([tokenizer(render_prompt(tokenizer, p, fmt)).input_ids])
        w = word_gates(tokenizer, ids, index) if index is not None else None
        idf = space.idf(ids) if keys.groups else None
        out[i] = gates(space, full, keys, tau, w, margin, select, token_weight=idf)[0, -1]
    return out


@torch.no_grad()
def open_matrix(model: nn.Module, tokenizer, space: GateSpace, gates_: list[Gate],
                input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tau: float = TAU) -> torch.Tensor:
    """(rows, gates) bool, for a right-padded batch: does each gate open at some token of each
    row, by τ or by its words? The margin, the closing text and the choice among a subject's
    gates (`select_open`) are left out: they only ever close a gate, so where this says False
    the gate is shut on every token of the row in any chain, and its edit never touches the
    row (the gate layer comes before the edited ones, so no other edit moves the states it
    reads; adding or removing a gate that stays shut cannot change which others pass the
    margin or are chosen either: a shut gate takes no part in either). Only the blocks up to
    the gate layer run."""
    dev = input_device(model)
    h = states_after(model, block_module(model, space.layer), input_ids.to(dev),
                     attention_mask.to(dev))[0]
    words = (word_gates(tokenizer, input_ids.cpu(), WordIndex.of_gates(gates_))
             if any(g.words for g in gates_) else None)
    g = gates(space, h.float().cpu(), KeyTable.of_gates(gates_), tau, words, select=False)
    return (g & attention_mask.cpu().bool()[..., None]).any(1)


def open_rows(model: nn.Module, tokenizer, space: GateSpace, gates_: list[Gate],
              input_ids: torch.Tensor, attention_mask: torch.Tensor, tau: float = TAU) -> list[bool]:
    """Per row of a right-padded batch: does one of `gates_` open at any of its tokens (see
    `open_matrix`)? A row where none opens is never touched by their edits."""
    opened = open_matrix(model, tokenizer, space, gates_, input_ids, attention_mask, tau)
    return opened.any(1).tolist()


def opens(model: nn.Module, tokenizer, space: GateSpace, gate: Gate, prompts: list[str],
          tau: float = TAU, fmt: str = "raw") -> list[bool]:  # (one gate: no margin to keep)
    """Per prompt: is `gate` open at its last token?"""
    return open_at_end(model, tokenizer, space, [gate], prompts, tau, fmt)[:, 0].tolist()


@contextmanager
def routed(model: nn.Module, edits: list[RoutedEdit], space: GateSpace, tau: float = TAU,
           tokenizer=None, margin: float | None = None):
    """Within the block, `model` behaves as base + Σ gate_i · ΔW_i (see the module doc).
    Hooks only: no weight is touched, so leaving the block restores the model exactly.
    Gate words count only when `tokenizer` is given (it reads the text of the input ids);
    `margin`: see `gates`."""
    if not edits:
        yield
        return
    state: dict[str, torch.Tensor] = {}
    keys = KeyTable.of_gates([e.gate for e in edits])
    words = [e.gate.words for e in edits] if tokenizer is not None else []  # all (): no words
    index = WordIndex.of_gates([e.gate for e in edits]) if words else WordIndex([])
    until = [e.gate.until for e in edits]
    if any(until) and tokenizer is None:
        raise ValueError("gates that close after their target need the tokenizer (to read it)")
    decoded: dict = {}

    def on_input(module, args, kwargs):
        state.pop("finish", None)
        state.pop("open", None)  # gates belong to one forward pass
        state.pop("open_ids", None)
        state.pop("row_ids", None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (newer, older transformers)
        past = (cache.get_seq_length() if hasattr(cache, "get_seq_length") else len(cache)) \
            if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and bool((mask[:, 0] == 0).any()):
            # a gate never opens on the first token (the attention sink), which padding moves
            raise ValueError("routed edits need right-padded (or unpadded) batches")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids.cpu() if ids is not None else None
        if past:
            # a cached step sees only its new tokens, but gates and words read the whole
            # sequence: follow the cache from the tokens and gate-layer states of the steps
            # before it, kept since the forward that started it
            seen = state.get("seq")
            if ids is None or seen is None or cache is not state.get("cache") \
                    or seen.shape != (ids.shape[0], past):
                raise RuntimeError("routed edits follow a KV cache only from the forward that "
                                   "filled it; run it without a cache (use_cache=False)")
            ids = torch.cat([seen, ids], 1)
        else:
            state["hidden"] = None  # a new sequence
        state["seq"], state["new"] = ids, (ids.shape[1] - past if ids is not None else None)
        texts = (token_texts(tokenizer, ids, decoded)
                 if ids is not None and (any(words) or any(until)) else None)
        state["texts"] = texts
        starts = _ANSWER_STARTS.get()
        state["starts"] = starts if starts is not None and ids is not None and \
            len(starts) == ids.shape[0] else None
        state["words"] = (word_gates(tokenizer, ids, index, decoded, texts)
                          if texts is not None and any(words) else None)
        # (the choice among a subject's gates weighs the text's tokens by their idf)
        state["idf"] = space.idf(ids) if keys.groups and ids is not None else None

    def on_output(module, args, output):
        state.pop("open", None)  # (returns None: the output stays as it is)
        state.pop("open_ids", None)
        state.pop("row_ids", None)
        # the cache this forward filled: the only one a later cached step may continue
        state["cache"] = getattr(output, "past_key_values", None)

    def on_gate(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if state.get("hidden") is not None:  # a cached step: the earlier tokens' states first
            h = torch.cat([state["hidden"], h], 1)
        state["hidden"] = h.detach()
        opened = gates(space, h, keys, tau, state.get("words"), margin,
                       token_weight=state.get("idf"))
        if any(until) and state.get("texts") is not None:
            opened = close_after(opened, state["texts"], until)
            if state.get("starts") is not None:
                opened = off_target(opened, state["texts"], until, state["starts"])
                state["finish"] = target_answers(opened, state["texts"], until, state["starts"])
        if state.get("new") is not None:  # (gates are causal: the new tokens' are as uncached)
            opened = opened[:, opened.shape[1] - state["new"]:]
        state["open"] = opened
        by_row = opened.any(1)  # (batch, edits)
        state["open_ids"] = by_row.any(0).nonzero().flatten().tolist()
        state["row_ids"] = [r.nonzero().flatten().tolist() for r in by_row]

    def on_logits(module, args, output):
        # an answer that takes its edit writes the whole target (see the module doc)
        finish = state.pop("finish", None)
        logits = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
        if not finish or logits is None:
            return None
        logits = logits.clone()
        for b, i, answer in finish:
            row = logits[b, -1]
            t = finish_token(tokenizer, decoded, int(state["seq"][b, -1]), answer, until[i], row)
            if t is not None:  # (its probability then ≥ 0.99 of the row's, sampled or not)
                row[t] = row.max() + math.log(row.numel()) + 5
        if isinstance(output, tuple):
            return (logits, *output[1:])
        output.logits = logits
        return output

    # per edited module: each edit's factors (None where it has none), by reference: nothing
    # is stacked or copied, so installing the thousandth edit does not copy the other 999's
    names: list[str] = []
    for e in edits:
        for name, layer in e.delta.layers.items():
            if not layer.is_lowrank:
                raise ValueError(f"{name}: routing applies low-rank (MEND) deltas only")
            block = _BLOCK.search(name)
            if block is None or int(block.group(1)) < space.layer:
                # an edit there would move the gate layer's states, and with them the gates
                raise ValueError(f"{name}: routing needs edited weights in blocks after the gate "
                                 f"layer {space.layer}; edit later layers or gate earlier")
            if name not in names:
                names.append(name)
    # on the module that owns the blocks: a causal LM calls it with the input ids, and so do
    # the shortcuts that skip the LM head (forward.selected_logits)
    inner = getattr(model, "base_model", model)
    handles = [inner.register_forward_pre_hook(on_input, with_kwargs=True),
               inner.register_forward_hook(on_output),
               block_module(model, space.layer).register_forward_hook(on_gate)]
    if any(until) and inner is not model:  # (on the model that returns logits)
        handles.append(model.register_forward_hook(on_logits))
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        dev = module.weight.device
        per_edit = [e.delta.layers[name].applied_factors(dev) if name in e.delta.layers else None
                    for e in edits]

        def add(module, args, output, per_edit=per_edit, dev=dev):
            x = args[0]
            if "open" not in state:
                raise RuntimeError("routed edits need the model's full forward pass: the gate "
                                   "layer did not run before an edited layer (a prefix cache?)")
            # per batch row, only the edits whose gate opens in it, each through its own
            # factors: a chain of a thousand routed edits costs what a row's open edits cost,
            # not a thousand times one, and a batch of prompts about different subjects does
            # not run every row through every subject's edit
            if not state["open_ids"]:
                return output
            opened, out = state["open"].to(dev), None
            for b, ids in enumerate(state["row_ids"]):
                for i in ids:
                    if per_edit[i] is None:  # (this edit has no rows at this weight)
                        continue
                    u, d = per_edit[i]
                    coef = (x[b].float() @ u.T) * opened[b, :, i, None]  # (T, rows)
                    if out is None:
                        out = torch.zeros(output.shape, dtype=torch.float32, device=dev)
                    out[b] += coef @ d
            return output if out is None else output + out.to(output.dtype)
        handles.append(module.register_forward_hook(add))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        state.clear()


def route_all(model: nn.Module, edits: list[tuple[RoutedEdit, dict]], space_of,
              tokenizer=None) -> ExitStack:
    """`routed` for edits made with different settings: one routing per (gate layer, τ,
    margin) of each edit's settings `s` (`space_of(layer)` gives that layer's gate space), so
    every edit keeps the settings it was made with. The hooks stay until the stack closes."""
    groups: dict[tuple, list[RoutedEdit]] = {}
    for r, s in edits:
        groups.setdefault((s["layer"], s["tau"], s.get("margin")), []).append(r)
    stack = ExitStack()
    try:
        for (layer, tau, margin), rs in groups.items():
            stack.enter_context(routed(model, rs, space_of(layer), tau, tokenizer, margin))
    except BaseException:
        stack.close()
        raise
    return stack
