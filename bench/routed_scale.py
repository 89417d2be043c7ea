"""Routed edits at scale: the cost of a forward pass on the default model with T = 0, 100 and
1,000 routed edits installed, against the unedited model.

The gates are real (each made from a distinct test/val-split fact on the default model, with
the workspace's routing settings, as `mendctl edit` makes them: subject words, closing after
the target); the deltas are random low-rank factors of a recorded routed edit's
size (rows per weight: --rows, 24 as measured on a shipped-editor edit), since only their
shapes cost time. Two kinds of input, each a right-padded batch of 16 prompts, timed as the
median of --repeats forward passes, each beside one of the unedited model (alternating, so a
drifting machine does not pass for overhead):
- unrelated: locality prompts of the bundled splits on which none of the T = max installed
  gates opens (the common case; `route.open_matrix`);
- edited: prompts of 16 of the installed edits (their gates open).
It also times installing the T edits' hooks (what every state load and edit does), the first
time (each edit's factors prepared) and again.

Usage: python bench/routed_scale.py [--lengths 0,100,1000] [--rows 24] [--repeats 15]
       [--out bench/results/routed_scale.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mib, table, temp_workspace, write_json  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.editors.delta import Delta, LayerDelta  # noqa: E402
from mendctl.editors.route import RoutedEdit, open_matrix, routed  # noqa: E402
from mendctl.editors.text import encode_prompts  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402


def random_delta(specs, rows: int, gen: torch.Generator) -> Delta:
    layers = {}
    for s in specs:
        out_f, in_f = s.out_features, s.in_features
        layers[s.name] = LayerDelta(s.name, tuple(s.shape), u=torch.randn(rows, in_f, generator=gen) * 1e-2,
                                    d=torch.randn(rows, out_f, generator=gen) * 1e-2,
                                    alpha=torch.tensor(1e-3), transposed=s.transposed)
    return Delta(layers, {})


def forward(model, batch) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return time.perf_counter() - t0


def paired(model, batch, install, repeats: int) -> tuple[float, float]:
    """Median seconds of a forward of `batch` on the unedited model and with `install()`'s
    hooks, the two alternating (so both see the same machine). Each install's first forward
    is left untimed, as the unedited model's first is: it fills caches (the token texts the
    gate words read) that a routed model in use keeps."""
    forward(model, batch)  # warm-up
    base, edited = [], []
    for _ in range(repeats):
        base.append(forward(model, batch))
        with install():
            forward(model, batch)
            edited.append(forward(model, batch))
    return statistics.median(base), statistics.median(edited)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="0,100,1000")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="bench/results/routed_scale.json")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    torch.set_num_threads(1)

    ws = Workspace.open(str(temp_workspace()))
    lm, s = ws.lm, ws.config.routing
    model, tok = lm.model, lm.tokenizer
    space = ws.router.space(s["layer"])
    pool = load_split("test") + load_split("val")
    seen, facts = set(), []
    for c in pool:
        if c.meta.get("subject") not in seen:
            seen.add(c.meta.get("subject"))
            facts.append(c)
    facts = facts[:max(lengths)]
    if len(facts) < max(lengths):  # say so: the split has fewer distinct subjects
        print(f"note: {len(facts)} distinct subjects; edits past that reuse facts", file=sys.stderr)
        facts = (facts * (max(lengths) // len(facts) + 1))[:max(lengths)]
    prompts = [c.input for c in facts]
    gen = torch.Generator().manual_seed(0)
    edits = []
    for c in tqdm(facts, desc="gates", file=sys.stderr):
        gate = ws.router.gate(c.input, s, c.target)
        edits.append(RoutedEdit(random_delta(ws.specs, a.rows, gen), gate))
    # prompts no installed gate opens on, from the splits' locality prompts
    pool_prompts = list(dict.fromkeys(p for c in pool for p in c.locality))
    unrelated = []
    for i in range(0, len(pool_prompts), 32):
        part = pool_prompts[i:i + 32]
        b = encode_prompts(tok, part, ws.fmt)
        shut = ~open_matrix(model, tok, space, [e.gate for e in edits], b.input_ids,
                            b.attention_mask, s["tau"]).any(1)
        unrelated += [p for p, ok in zip(part, shut.tolist()) if ok]
        if len(unrelated) >= 16:
            break
    batches = {"unrelated": encode_prompts(tok, unrelated[:16], ws.fmt),
               "edited": encode_prompts(tok, prompts[:16], ws.fmt)}
    rows, out = [], {"rows_per_weight": a.rows, "repeats": a.repeats, "runs": []}
    for n in lengths:
        # installing the hooks, as every state load and every edit does: the first time the
        # edits' factors are prepared, later ones reuse them
        installs = []
        for _ in range(2):
            t0 = time.perf_counter()
            with routed(model, edits[:n], space, s["tau"], tok, s.get("margin")):
                installs.append(time.perf_counter() - t0)
        base, t = {}, {}
        for k, b in batches.items():
            base[k], t[k] = paired(model, b, lambda: routed(model, edits[:n], space, s["tau"], tok,
                                                            s.get("margin")), a.repeats)
        run = {"T": n, "seconds": t, "base_seconds": base, "overhead": {k: t[k] / base[k] - 1 for k in t},
               "install_seconds": {"first": installs[0], "again": installs[1]},
               "peak_rss_mib": peak_rss_mib()}
        out["runs"].append(run)
        rows.append({"T": n, **{f"{k} overhead": f"{run['overhead'][k]:+.1%}" for k in t},
                     "install s (first / again)": f"{installs[0]:.3f} / {installs[1]:.3f}",
                     "peak RSS MiB": f"{run['peak_rss_mib']:.0f}"})
    print(table(rows, list(rows[0])))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
