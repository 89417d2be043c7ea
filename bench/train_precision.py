"""Does editor training learn the same in bf16 mixed precision as in float32?

Trains a fresh MEND editor (routed edits, as `mendctl train` does by default) for `--steps`
steps twice from the same initial weights, seed, cases, paraphrases and locality prompts:
once in float32 and once in bf16 mixed precision (what `Trainer` uses where the hardware
multiplies bf16 natively). Each step's losses and scores are compared step for step (the
same batches), in windows; prints a table, writes JSON and draws both curves.

    python bench/train_precision.py [--steps 300] [--cases 1000]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

from mendctl.editors.data import generic_text_samples, load_split  # noqa: E402
from mendctl.editors.mend.editor import MendEditor  # noqa: E402
from mendctl.editors.mend.trainer import TrainConfig, Trainer  # noqa: E402
from mendctl.editors.weights import select_weights  # noqa: E402
from mendctl.models import load_model  # noqa: E402

STATS = ("l_edit", "l_loc", "es", "loc")


def train(model, tok, specs, cases, init: dict, bf16: bool, steps: int, memo=None):
    """Per step (l_edit, l_loc, es, loc), the seconds the steps took, and the trainer's
    remembered lower-block states (shared by the second run: the same base model)."""
    editor = MendEditor(specs)
    editor.load_state_dict(init)
    cfg = TrainConfig(steps=steps, gated=True)
    trainer = Trainer(editor, model, tok, cases, [], cfg, progress=False,
                      generic_texts=generic_text_samples(), generic_loc=0.25)
    trainer.bf16 = bf16
    trainer.prepare_locality()
    if memo is not None:
        trainer.prefix.memo = memo
    trainer.prepare_prefixes()
    trainer.warm_up_normaliser()
    rows = []
    t = time.perf_counter()
    for _ in range(steps):  # the run's step, without validation
        stats, _ = trainer.train_step()
        rows.append([stats[k] for k in STATS])
    return torch.tensor(rows), time.perf_counter() - t, trainer.prefix.memo


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/train_precision.json")
    ap.add_argument("--plot", default="docs/train_precision.png")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    specs = select_weights(lm.model, ["auto"])
    cases = load_split("train")[: a.cases]
    torch.manual_seed(0)
    init = copy.deepcopy(MendEditor(specs).state_dict())
    f32, s32, memo = train(lm.model, lm.tokenizer, specs, cases, init, False, a.steps)
    b16, s16, _ = train(lm.model, lm.tokenizer, specs, cases, init, True, a.steps, memo)
    rows, windows = [], []
    for lo in range(0, a.steps, a.window):
        hi = min(lo + a.window, a.steps)
        w = {"steps": f"{lo}–{hi}"}
        for i, k in enumerate(STATS):
            d = b16[lo:hi, i] - f32[lo:hi, i]
            se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
            w[k] = {"float32": round(float(f32[lo:hi, i].mean()), 4),
                    "bf16": round(float(b16[lo:hi, i].mean()), 4),
                    "difference": round(float(d.mean()), 4), "se": round(se, 4)}
        windows.append(w)
        rows.append({"steps": w["steps"], **{k: f"{w[k]['float32']:.3f} / {w[k]['bf16']:.3f} "
                                                 f"({w[k]['difference']:+.3f} ± {w[k]['se']:.3f})"
                                              for k in STATS}})
    print(table(rows, ["steps", *STATS]))
    speed = {"float32": a.steps * 4 / s32, "bf16": a.steps * 4 / s16}
    print(f"float32 / bf16 (each step's mean, difference bf16 − float32 ± its standard error over "
          f"the window's paired steps); edits/s float32 {speed['float32']:.2f}, bf16 {speed['bf16']:.2f}")
    write_json(a.out, {"steps": a.steps, "cases": a.cases, "threads": a.threads, "windows": windows,
                       "edits_per_second": {k: round(v, 2) for k, v in speed.items()},
                       "per_step": {"float32": f32.tolist(), "bf16": b16.tolist()}})
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        k = 20  # a moving mean over this many steps
        smooth = lambda x: torch.nn.functional.avg_pool1d(x[None, None], k, 1)[0, 0]  # noqa: E731
        for ax, i, name in ((axes[0], 0, "edit loss (paraphrase NLL)"), (axes[1], 1, "locality loss (KL)")):
            for x, label in ((f32, "float32"), (b16, "bf16 mixed precision")):
                ax.plot(range(k - 1, a.steps), smooth(x[:, i]).tolist(), label=label)
            ax.set_xlabel("step (4 routed edits each)")
            ax.set_title(f"{name}, mean of {k} steps")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
