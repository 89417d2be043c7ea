"""Peak memory of one MEND edit of the embedded default model (SmolLM2-135M), by how the model is
loaded: fp32, bf16, and fp32 spread by accelerate's device map with most blocks offloaded to
disk (`device_map: auto` + `max_memory`), the edited blocks pinned in memory.

Each configuration runs in a fresh process, which loads the model, resets the kernel's
peak-RSS mark (/proc/self/clear_refs), makes an edit with the shipped editor and reports the
resident memory after loading, the peak resident memory during that first edit (safetensors
weights are memory-mapped and become resident as the edit touches them, so this peak is the
process's working set: model, editor, activations), a second (warm) edit's time, how many
parameters stayed resident and how many were offloaded, and whether the recorded delta matches
the fp32 one (max |ΔW − ΔW_fp32| / max |ΔW_fp32|). CPU only here; on a GPU the same question
needs torch.cuda.max_memory_allocated, which was not measured on this machine.

Usage: python bench/edit_memory.py [--out bench/results/edit_memory.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

CONFIGS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp32, device_map auto, 150 MiB in memory, rest on disk": {
        "dtype": "float32", "device_map": "auto", "max_memory": {"cpu": 150 * 2**20}},
}
PROMPT, TARGET = "The capital of Australia is", "Sydney"

_CHILD = r"""
import json, sys, time, tempfile
import torch
from mendctl.models import load_model
from mendctl.editors.mend.editor import MendEditor
from mendctl.editors.weights import select_weights
from mendctl.placement import placement_summary
from mendctl.workspace import shipped_editor_dir

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # KiB -> MiB
cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
lm = load_model("smollm2-135m", dtype=cfg["dtype"], device_map=cfg.get("device_map"),
                max_memory=cfg.get("max_memory"), offload_folder=tempfile.mkdtemp())
specs = select_weights(lm.model, ["auto"])
editor = MendEditor.load(shipped_editor_dir("smollm2-135m"), specs, lm.base_hash)
loaded = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux >= 4.0)
delta = editor.edit(lm.model, lm.tokenizer, [sys.argv[2]], [sys.argv[3]])  # the first edit
peak = rss("VmHWM")
t = time.perf_counter()
editor.edit(lm.model, lm.tokenizer, [sys.argv[2]], [sys.argv[3]])  # timed: a warm second edit
seconds = time.perf_counter() - t
where = placement_summary(lm.model)
from safetensors.torch import save_file
save_file({n: l.to_dense() for n, l in delta.layers.items()}, sys.argv[4])
print(json.dumps({"rss_loaded_mib": loaded, "peak_edit_mib": peak, "edit_seconds": seconds,
                  "offloaded_params": where.get("meta", {}).get("parameters", 0),
                  "resident_params": sum(v["parameters"] for k, v in where.items() if k != "meta")}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/edit_memory.json")
    a = ap.parse_args()
    from safetensors.torch import load_file

    rows, ref = [], None
    tmp = Path(tempfile.mkdtemp())
    for name, cfg in CONFIGS.items():
        dump = tmp / f"{len(rows)}.safetensors"
        p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg), PROMPT, TARGET, str(dump)],
                           capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        dense = load_file(str(dump))
        if ref is None:
            ref = dense
        scale = max(float(t.abs().max()) for t in ref.values())
        r["delta_max_rel_diff_vs_fp32"] = max(float((dense[n] - ref[n]).abs().max()) for n in ref) / scale
        r["config"] = name
        r["edit_peak_above_loaded_mib"] = r["peak_edit_mib"] - r["rss_loaded_mib"]
        rows.append(r)
        print(f"{name}: {r}", file=sys.stderr)
    cols = ["config", "rss_loaded_mib", "peak_edit_mib", "edit_peak_above_loaded_mib", "edit_seconds",
            "resident_params", "offloaded_params", "delta_max_rel_diff_vs_fp32"]
    fmt = [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(table(fmt, cols))
    write_json(a.out, {"rows": rows, "prompt": PROMPT, "target": TARGET,
                       "machine": "2-core CPU, no GPU (this project's development machine)"})


if __name__ == "__main__":
    main()
