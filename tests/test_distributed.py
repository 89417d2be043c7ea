"""Data-parallel editor training (editors/mend/distributed.py, `mendctl train --num-processes`).

Two gloo processes on the CPU, one thread each, train the tiny Llama's editor with the same
seed and the same global batch as one process; the result must be the single-process editor
(network, α and normalisation statistics) up to float rounding, both processes must hold the
same editor bit for bit, only the main process may write checkpoints, and a decision to stop
taken by the main process must stop the other one too.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LOCALITY_PROMPTS, fact_paraphrase, fact_prompt
from mendctl.editors.data import EditCase
from mendctl.editors.mend import distributed
from mendctl.editors.mend.editor import MendConfig, MendEditor
from mendctl.editors.mend.trainer import TrainConfig, Trainer
from mendctl.editors.weights import select_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import fresh_ws, one_line_error, tiny_assets  # noqa: E402,F401

# Two processes compute the same step as one process, but not with the same float operations:
# each pads its own share of the sequences to its own width, runs smaller matrix products and
# sums its gradient share before the shares are added, so float32 sums are taken in another
# order. Measured: the summed gradients differ from the single-process ones by ~5e-7 relative;
# after five Adam steps (which pass relative gradient errors straight into the update) the
# largest parameter difference is ~1.2e-6 on entries of size ~1 and ≤ 3e-7 on entries near 0.
# An Adam step moves each parameter by at most about the learning rate whatever its size, and
# a gradient entry near 0 can flip its update's sign on another CPU's rounding, so the error
# scale of an entry near 0 is the learning rate, not the entry: rtol 1e-4 for the entries of
# size ~1 and atol 1 % of the learning rate (3e-5, 100× the measured) for those near 0, while
# any real mistake (a lost or doubled share, an edit missing from the batched edit, an RNG or
# normaliser out of step) moves parameters by about the learning rate (3e-3) or more.
LR = 3e-3
TOL = dict(rtol=1e-4, atol=1e-2 * LR)
GENERIC = ["the sky is blue and the grass is green near the river",
           "tell me about the big city of london and the river near it"]


def _cases(indices, seed):
    r = random.Random(seed)
    return [EditCase(fact_prompt(f"s{i}"), f"c{r.randrange(12)}",
                     paraphrases=[fact_paraphrase(f"s{i}")],
                     locality=[r.choice(LOCALITY_PROMPTS)]) for i in indices]


TRAIN, VAL = _cases(range(16), 1), _cases(range(16, 24), 2)


def _config(**changes) -> TrainConfig:
    # 4 edits per step: each of the two processes takes 2; validation at steps 2, 4 and 5
    kw = dict(steps=5, edits_per_step=4, lr=LR, alpha_lr=1e-2, val_every=2, val_cases=4,
              norm_warmup=3, seed=0)
    kw.update(changes)
    return TrainConfig(**kw)


def _trainer(model_dir: Path, cfg: TrainConfig, state_dir: Path, replicas=None) -> Trainer:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    editor = MendEditor(select_weights(model, "auto"), MendConfig(rank=8, init_alpha=1e-3))
    # generic passages too, so every random choice of the step (paraphrase, locality prompt,
    # generic or not) has to stay in step across the processes
    trainer = Trainer(editor, model, tok, TRAIN, VAL, cfg, progress=False, out_dir=state_dir,
                      generic_texts=GENERIC, generic_loc=0.3, replicas=replicas)
    # float32, whose rounding the tolerances below follow, wherever the CPU has bf16 (the
    # split of the step across processes is under test, not mixed precision)
    trainer.bf16 = False
    return trainer


def _count_writes(trainer: Trainer, log: Path) -> None:
    """Record every checkpoint and training-state write of this process in `log`."""
    save, save_state = trainer.editor.save, trainer.save_state

    def counted(fn, what):
        def wrapper(*a, **k):
            with log.open("a") as f:
                f.write(what + "\n")
            return fn(*a, **k)
        return wrapper

    trainer.editor.save = counted(save, "checkpoint")
    trainer.save_state = counted(save_state, "state")


def _moments(trainer: Trainer) -> dict:
    """Adam's first and second moments: unlike the parameters they scale with the gradient
    (Adam's step does not), so they show a gradient summed with the wrong weight."""
    return {f"{i}.{k}": v.contiguous() for i, st in trainer.opt.state_dict()["state"].items()
            for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}


def _worker(model_dir: str, out: str) -> dict:
    """One of the two launched processes (module level, so the spawned process imports it)."""
    replicas = distributed.join("cpu")
    assert replicas.world == 2 and torch.distributed.get_backend() == "gloo"
    out = Path(out)
    r = replicas.rank
    trainer = _trainer(Path(model_dir), _config(), out / "state", replicas)
    _count_writes(trainer, out / f"writes-{r}.log")
    result = trainer.run(out / "best")
    save_file({k: v.contiguous() for k, v in trainer.editor.state_dict().items()},
              str(out / f"editor-{r}.safetensors"))
    save_file(_moments(trainer), str(out / f"moments-{r}.safetensors"))
    # a stop decided by the main process: nothing learns (lr 0), so the second validation
    # is no better than the first and patience 1 ends the run at step 2 of 50
    stopper = _trainer(Path(model_dir), _config(steps=50, lr=0.0, alpha_lr=0.0, val_every=1,
                                                patience=1, val_cases=2, norm_warmup=1),
                       None, replicas)
    early = stopper.run(out / "best-early")
    doc = {"steps": result.steps, "best_step": result.best_step, "history": result.history,
           "early_steps": early.steps}
    (out / f"result-{r}.json").write_text(json.dumps(doc))
    return doc


def test_train_step_is_the_runs_step(tiny_llama, tiny_tokenizer, tmp_path):
    """`Trainer.train_step` (what the benchmarks time) is the step `run` takes: the same
    steps from the same start give the same editor, bit for bit, α kept positive included."""
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    cfg = _config(val_every=10**6)  # (validation only after the last step, which moves nothing)
    ran = _trainer(model_dir, cfg, tmp_path / "ran-state")
    ran.run(tmp_path / "ran-best")
    stepped = _trainer(model_dir, cfg, tmp_path / "stepped-state")
    stepped.prepare_locality()
    stepped.prepare_prefixes()
    stepped.warm_up_normaliser()
    for _ in range(cfg.steps):
        stats, over = stepped.train_step()
        assert not over and set(stats) >= {"loss", "es", "loc"}
    assert stepped.step == ran.step == cfg.steps
    want, got = ran.editor.state_dict(), stepped.editor.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert float(got["alpha"].min()) > 0 and not torch.equal(
        got["alpha"], MendEditor(stepped.editor.specs, MendConfig(rank=8, init_alpha=1e-3)).state_dict()["alpha"])


@pytest.mark.subprocess  # two real training processes (distributed.launch)
def test_two_processes_train_the_single_process_editor(tiny_llama, tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))

    # the reference: one process, same seed, same global batch
    single = _trainer(model_dir, _config(), tmp_path / "single-state")
    ref = single.run(tmp_path / "single-best")
    want = single.editor.state_dict()

    out = tmp_path / "dp"
    out.mkdir()
    got_main = distributed.launch(_worker, (str(model_dir), str(out)), num_processes=2, threads=1)

    editors = [load_file(str(out / f"editor-{r}.safetensors")) for r in range(2)]
    results = [json.loads((out / f"result-{r}.json").read_text()) for r in range(2)]
    assert got_main == results[0]
    # both processes hold the same editor, bit for bit (same summed gradients, same steps)
    assert editors[0].keys() == editors[1].keys() == want.keys()
    for k in want:
        assert torch.equal(editors[0][k], editors[1][k]), k
    # ... and it is the single-process editor, up to float rounding
    norm_keys = [k for k in want if ".norm_" in k]
    assert {k.rsplit(".", 1)[1] for k in norm_keys} == {"count", "mean", "m2"}
    for k in want:
        if k.endswith(".count"):  # the normalisers saw exactly the same tokens
            assert torch.equal(editors[0][k], want[k]), k
        else:
            torch.testing.assert_close(editors[0][k], want[k], **TOL, msg=k)
    # the summed gradients had the single-process scale and direction, step after step
    moments = [load_file(str(out / f"moments-{r}.safetensors")) for r in range(2)]
    want_m = _moments(single)
    assert moments[0].keys() == want_m.keys()
    assert len(want_m) == 2 * len(list(single.editor.parameters()))
    for k, v in want_m.items():
        assert torch.equal(moments[0][k], moments[1][k]), k
        torch.testing.assert_close(moments[0][k], v, rtol=1e-4,
                                   atol=1e-4 * float(v.abs().max()), msg=k)
    # the editor moved (a run that changed nothing would match trivially)
    start = MendEditor(single.editor.specs, MendConfig(rank=8, init_alpha=1e-3)).state_dict()
    assert not torch.allclose(want["alpha"], start["alpha"])
    assert float(want[norm_keys[0].rsplit(".", 1)[0] + ".count"]) > 0

    # the same run: steps, validations (made by the main process, adopted by the other)
    for res in results:
        assert res["steps"] == ref.steps == 5
        assert res["best_step"] == ref.best_step
        assert [h["step"] for h in res["history"]] == [2, 4, 5]
        for h, h_ref in zip(res["history"], ref.history):
            for k in ("step", "edit_success", "paraphrase_success", "locality"):
                assert h[k] == h_ref[k], (k, h, h_ref)
            assert abs(h["alpha_mean"] - h_ref["alpha_mean"]) <= TOL["rtol"] * h_ref["alpha_mean"]
        # the main process decided to stop at step 2; the other stopped with it
        assert res["early_steps"] == 2

    # only the main process wrote checkpoints and training state
    assert not (out / "writes-1.log").exists()
    writes = (out / "writes-0.log").read_text().split()
    assert writes.count("state") == 3 and 1 <= writes.count("checkpoint") <= 3
    best = MendEditor.load(out / "best", single.editor.specs)
    doc = json.loads((out / "best" / "editor.json").read_text())
    assert doc["training"]["processes"] == 2
    assert doc["training"]["throughput"]["processes"] == 2
    assert doc["training"]["best_step"] == results[0]["best_step"]
    assert sorted(p.name for p in (out / "best").iterdir()) == ["editor.json", "editor.safetensors"]
    assert sorted(p.name for p in (out / "state").iterdir()) == ["train_state.json",
                                                                  "train_state.safetensors"]
    # the best checkpoint is the single-process run's best one, up to float rounding
    # (whichever step was best: both runs agree on it, checked above)
    single_best = MendEditor.load(tmp_path / "single-best", single.editor.specs).state_dict()
    for k, v in best.state_dict().items():
        if k.endswith(".count"):
            assert torch.equal(v, single_best[k]), k
        else:
            torch.testing.assert_close(v, single_best[k], **TOL, msg=k)


def test_part_splits_contiguously_in_rank_order():
    for n in (4, 5, 7, 8):
        for world in (1, 2, 3):
            parts = [distributed.Replicas(r, world).part(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1
    one = distributed.Replicas()
    assert one.main and not one.parallel and one.part(4) == (0, 4)
    x = torch.arange(6.0).reshape(3, 2)
    assert one.gather_rows(x) is x and one.broadcast("a") == "a" and one.gather_objects(1) == [1]


@pytest.mark.subprocess  # the CLI starts two real training processes
def test_cli_train_num_processes(fresh_ws, tmp_path):
    """`mendctl train --num-processes 2` end to end: the CLI starts two processes that train
    one editor, written once, recording how it was made."""
    rows = [{"input": f"The capital of country {i} is", "target": f"City {i}",
             "paraphrases": [f"Country {i} has its capital in"],
             "locality": ["The capital of France is", "Water boils at"]} for i in range(8)]
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "editor"
    args = ["train", "--out", out, "--data", data, "--val-data", data, "--rank", "4",
            "--steps", "3", "--edits-per-step", "2", "--val-every", "2", "--val-cases", "2"]
    # a share of every step for every process, or a one-line error before anything starts
    err = one_line_error(fresh_ws.run(*args, "--num-processes", "3"))
    assert "--edits-per-step" in err and not out.exists()

    r = fresh_ws.ok(*args, "--num-processes", "2", timeout=240)
    assert r.stdout.count("editor written to") == 1
    doc = json.loads((out / "editor.json").read_text())
    assert doc["training"]["processes"] == 2 and doc["training"]["stopped_at_step"] == 3
    assert "--num-processes 2" in doc["reproduce"]
    assert [h["step"] for h in doc["training"]["history"]] == [2, 3]
    assert (out / "train_state" / "train_state.safetensors").is_file()
