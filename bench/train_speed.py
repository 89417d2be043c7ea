"""Editor-training throughput on the real model: edits per second of the training step.

Measures, in one run on one training set (the first `--cases` cases of the bundled train split):
- cold: steps as a run's first pass meets them, each new sequence's frozen lower blocks
  computed inside the step (what training did before `Trainer.prepare_prefixes`);
- the up-front pass over every sequence the steps can draw (`prepare_prefixes`): seconds and
  sequences per second;
- warm: steps once every sequence is remembered (the steady state of a run after that pass),
  in float32 and in bf16 mixed precision (what training uses where the hardware multiplies bf16
  natively, `forward.native_bf16`), alternating in rounds so that both see the same machine;
  and how far bf16 moves the step's gradient: the cosine and norm ratio of the editor's
  gradient on the same steps, bf16 against float32;
- a whole run of `--run-edits` edits: precompute plus that many edits at the warm rate.

A step is `Trainer.losses` + backward + Adam step on 4 single edits (the default), routed
as `mendctl train` trains them in a workspace of routed edits (the default; `--plain`: weight
edits, as in a `--weights plain` workspace). Prints a table and writes JSON (default
bench/results/train_speed.json).

    python bench/train_speed.py [--cases 1000] [--steps 25] [--threads 2] [--plain]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, table, write_json  # noqa: E402

from mendctl.editors.data import generic_text_samples, load_split  # noqa: E402
from mendctl.editors.forward import native_bf16  # noqa: E402
from mendctl.editors.mend.editor import MendEditor  # noqa: E402
from mendctl.editors.mend.trainer import TrainConfig, Trainer  # noqa: E402
from mendctl.editors.weights import select_weights  # noqa: E402
from mendctl.models import load_model  # noqa: E402


def steps_per_second(trainer: Trainer, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps / (time.perf_counter() - t)


def timed_rounds(trainer: Trainer, modes: dict, steps: int, rounds: int = 5) -> dict:
    """Edits per second with each `Trainer.bf16` setting, measured in alternating rounds."""
    seconds = {k: 0.0 for k in modes}
    per = max(1, steps // rounds)
    for _ in range(rounds):
        for k, p in modes.items():
            trainer.bf16 = p
            seconds[k] += per / steps_per_second(trainer, per)
    return {k: rounds * per * trainer.cfg.edits_per_step / s for k, s in seconds.items()}


def gradient_agreement(trainer: Trainer, steps: int = 5) -> tuple[float, float]:
    """Over `steps` steps (the same cases, paraphrases and locality prompts for both), the
    worst cosine and the mean norm ratio of the editor's gradient in bf16 mixed precision
    against float32. No optimizer step is taken."""
    params = [p for p in trainer.editor.parameters() if p.requires_grad]
    cos, ratio = [], []
    for _ in range(steps):
        cases = trainer.sample(trainer.cfg.edits_per_step)
        state = trainer.rng.getstate()
        grads = []
        for p in (False, True):
            trainer.rng.setstate(state)
            trainer.bf16 = p
            trainer.opt.zero_grad(set_to_none=True)
            trainer.losses(cases)[0].backward()
            grads.append(torch.cat([q.grad.flatten() for q in params if q.grad is not None]))
        cos.append(float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)))
        ratio.append(float(grads[1].norm() / grads[0].norm()))
    trainer.opt.zero_grad(set_to_none=True)
    return min(cos), sum(ratio) / len(ratio)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-edits", type=int, default=40_000)
    ap.add_argument("--plain", action="store_true", help="weight edits instead of routed ones")
    ap.add_argument("--out", default="bench/results/train_speed.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    specs = select_weights(model, ["auto"])
    train = load_split("train")[: a.cases]
    cfg = TrainConfig(steps=10**6, norm_warmup=2, gated=not a.plain)
    trainer = Trainer(MendEditor(specs), model, tok, train, [], cfg, progress=False,
                      generic_texts=generic_text_samples(), generic_loc=0.25)
    trainer.prepare_locality()
    trainer.warm_up_normaliser()
    n = cfg.edits_per_step
    cold = steps_per_second(trainer, a.steps) * n
    t = time.perf_counter()
    before = len(trainer.prefix.memo)
    trainer.prepare_prefixes()
    prep_s = time.perf_counter() - t
    computed = len(trainer.prefix.memo) - before
    default = trainer.bf16  # where the hardware multiplies bf16 natively (Trainer)
    rates = timed_rounds(trainer, {"float32": False, "bf16": True}, a.steps)
    cos, ratio = gradient_agreement(trainer)
    trainer.bf16 = default
    warm = rates["bf16" if default else "float32"]
    run_s = prep_s + a.run_edits / warm
    res = {
        "cases": a.cases, "steps": a.steps, "edits_per_step": n, "threads": a.threads,
        "edits": "weights" if a.plain else "routed",
        "cold_edits_per_second": round(cold, 2), "warm_edits_per_second": round(warm, 2),
        "precompute_seconds": round(prep_s, 1), "precompute_sequences": computed,
        "precompute_sequences_per_second": round(computed / prep_s, 1) if prep_s else None,
        "precision": "bf16 mixed" if default else "float32",
        "native_bf16": native_bf16("cpu"),
        "warm_edits_per_second_float32": round(rates["float32"], 2),
        "warm_edits_per_second_bf16": round(rates["bf16"], 2),
        "bf16_gradient_cosine_min": round(cos, 5), "bf16_gradient_norm_ratio": round(ratio, 4),
        "run_edits": a.run_edits, "run_edits_per_second": round(a.run_edits / run_s, 2),
        "run_edits_per_second_cold": round(cold, 2),
        "peak_rss_mib": round(peak_rss_mib()),
    }
    print(table([
        {"phase": "cold steps (lower blocks inside the step)", "edits/s": f"{cold:.2f}"},
        {"phase": f"precompute {computed} sequences", "edits/s": "",
         "seconds": f"{prep_s:.0f}"},
        {"phase": "warm steps, float32", "edits/s": f"{rates['float32']:.2f}"},
        {"phase": "warm steps, bf16 mixed precision", "edits/s": f"{rates['bf16']:.2f}"},
        {"phase": f"warm steps as training runs them ({res['precision']})",
         "edits/s": f"{warm:.2f}"},
        {"phase": f"run of {a.run_edits} edits incl. precompute", "edits/s": f"{a.run_edits / run_s:.2f}",
         "seconds": f"{run_s:.0f}"},
    ], ["phase", "edits/s", "seconds"]))
    print(f"warm ÷ cold: {warm / cold:.2f}×; bf16 ÷ float32: {rates['bf16'] / rates['float32']:.2f}×; "
          f"bf16 gradient: cosine ≥ {cos:.4f}, norm ratio {ratio:.3f}; peak RSS {res['peak_rss_mib']} MiB")
    write_json(a.out, res)


if __name__ == "__main__":
    main()
