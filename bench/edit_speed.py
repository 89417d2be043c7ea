"""Editor speed on the embedded default model (SmolLM2-135M), measured in one run:

- MEND edit compute time ÷ the forward+backward of the same example down to the edited
  weights (the floor: MEND needs exactly that pass, plus its small networks);
- MEND vs FT vs FT+KL wall time per edit on the same cases, with their edit success; MEND
  both as one step (the paper) and at the editor's operating point (up to its recorded
  `max_steps`, as `mendctl edit` runs it), the latter being the speed-up that counts;
- training throughput (edits per second in Trainer.losses + backward + Adam step);
- peak memory of the process.

Usage: python bench/edit_speed.py [--cases 20] [--out bench/results/edit_speed.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mib, table, write_json  # noqa: E402

from mendctl.editors.data import generic_text_samples, load_split  # noqa: E402
from mendctl.editors.ft import FTEditor  # noqa: E402
from mendctl.editors.mend.capture import edit_loss, grad_only_on  # noqa: E402
from mendctl.editors.mend.editor import MendEditor  # noqa: E402
from mendctl.editors.mend.trainer import TrainConfig, Trainer  # noqa: E402
from mendctl.editors.metrics import edit_success  # noqa: E402
from mendctl.editors.text import encode_pairs  # noqa: E402
from mendctl.editors.weights import applied, select_weights  # noqa: E402
from mendctl.models import load_model  # noqa: E402
from mendctl.workspace import shipped_editor_dir  # noqa: E402


def floor_seconds(model, specs, batch) -> float:
    """One forward+backward of the edit loss down to the edited weights (their grads only)."""
    names = [s.name for s in specs]
    with grad_only_on(model, names), torch.enable_grad():
        t = time.perf_counter()
        loss = edit_loss(model, batch)
        torch.autograd.grad(loss, [model.get_parameter(n) for n in names])
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--out", default="bench/results/edit_speed.json")
    a = ap.parse_args()
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    specs = select_weights(model, ["auto"])
    mend = MendEditor.load(shipped_editor_dir("smollm2-135m"), specs, lm.base_hash)
    cases = load_split("test")[: a.cases]
    for c in cases[:2]:  # warm-up
        mend.edit(model, tok, [c.input], [c.target])
        floor_seconds(model, specs, encode_pairs(tok, [c.input], [c.target]))
    rows, per = [], {}
    ratios = []
    op_steps = int((mend.info.get("operating_point") or {}).get("max_steps") or 1)
    editors = [("mend", mend, {})]
    if op_steps > 1:
        editors.append((f"mend_steps{op_steps}", mend, {"max_steps": op_steps}))
    for name, ed, kw in editors + [("ft", FTEditor(specs), {}),
                     ("ft_kl", FTEditor(specs, kl_weight=1.0, generic_texts=generic_text_samples()), {})]:
        times, ok = [], []
        for c in cases:
            t = time.perf_counter()
            d = ed.edit(model, tok, [c.input], [c.target], locality=c.locality or None, **kw)
            times.append(time.perf_counter() - t)
            with applied(model, d):
                ok += edit_success(model, tok, [c.input], [c.target])
            if name == "mend":
                # min of 3 repeats for both, so scheduling noise does not pick the winner
                enc = encode_pairs(tok, [c.input], [c.target])
                fl = min(floor_seconds(model, specs, enc) for _ in range(3))
                ed_t = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    mend.edit(model, tok, [c.input], [c.target])
                    ed_t.append(time.perf_counter() - t0)
                ratios.append(min(ed_t) / fl)
        per[name] = {"ms_per_edit": 1000 * statistics.median(times), "edit_success": sum(ok) / len(ok)}
        rows.append({"editor": name, "median ms/edit": f"{per[name]['ms_per_edit']:.0f}",
                     "edit success": f"{per[name]['edit_success']:.2f}"})
    # training throughput: the real training step on the real model, editor from scratch
    train = load_split("train")[:400]
    trainer = Trainer(MendEditor(specs), model, tok, train, train[:4],
                      TrainConfig(steps=10**6, norm_warmup=2), progress=False)
    t = time.perf_counter()
    trainer.prepare_locality()  # once per run: base continuations of the locality prompts
    prep_s = time.perf_counter() - t
    trainer.warm_up_normaliser()
    for _ in range(3):
        loss, _ = trainer.losses(trainer.sample(4)); loss.backward()
    state = trainer.rng.getstate()

    def steps():
        t = time.perf_counter()
        for _ in range(a.train_steps):
            trainer.train_step()
        return a.train_steps * trainer.cfg.edits_per_step / (time.perf_counter() - t)

    eps = steps()  # cold: most sequences are new, their lower blocks are computed
    trainer.rng.setstate(state)
    eps_warm = steps()  # the same cases again: every prefix comes from the memo
    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "cases": len(cases),
        "edit_over_floor_median": statistics.median(ratios),
        # at the operating point (what `mendctl edit` does); equal to the one-step row without one
        "mend_operating_point_steps": op_steps,
        "mend_vs_ft_speedup": per["ft"]["ms_per_edit"] / per[editors[-1][0]]["ms_per_edit"],
        "mend_vs_ft_kl_speedup": per["ft_kl"]["ms_per_edit"] / per[editors[-1][0]]["ms_per_edit"],
        "mend_one_step_vs_ft_speedup": per["ft"]["ms_per_edit"] / per["mend"]["ms_per_edit"],
        "editors": per, "train_edits_per_second": eps,
        "train_edits_per_second_warm": eps_warm, "locality_precompute_seconds": prep_s,
        "train_note": "first pass over the sampled cases (prefix memo cold for most sequences); "
                      "warm: the same steps again, every prefix from the memo",
        "peak_rss_mib": peak_rss_mib(),
    }
    print(table(rows, ["editor", "median ms/edit", "edit success"]))
    print(f"MEND edit / forward+backward floor (median): {result['edit_over_floor_median']:.2f}")
    print(f"MEND (≤{op_steps} steps) vs FT speed-up: {result['mend_vs_ft_speedup']:.1f}x, "
          f"vs FT+KL: {result['mend_vs_ft_kl_speedup']:.1f}x")
    print(f"training throughput: {eps:.1f} edits/s cold, {eps_warm:.1f} warm "
          f"(locality continuations precomputed in {prep_s:.0f} s); peak RSS {result['peak_rss_mib']:.0f} MiB")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
