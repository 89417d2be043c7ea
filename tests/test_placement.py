"""Big-model loading through accelerate (mendctl/placement.py) on a tiny model: a model spread
by a device map and partly offloaded to disk edits exactly like the plainly loaded one, its
edited weights stay resident, and the base hash does not depend on placement or dtype."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import CHAIN, fresh_ws, init_workspace_inprocess, tiny_assets  # noqa: E402,F401

from mendctl.editors.mend.editor import MendEditor  # noqa: E402
from mendctl.editors.weights import select_weights  # noqa: E402
from mendctl.errors import ConfigError, ModelError  # noqa: E402
from mendctl.models import load_model  # noqa: E402
from mendctl.placement import main_device, placement_summary, plan_device_map  # noqa: E402
from mendctl.edit import edit  # noqa: E402

PROMPTS, TARGETS = [CHAIN[0][0], CHAIN[1][0]], [CHAIN[0][1], CHAIN[1][1]]

EPS32 = torch.finfo(torch.float32).eps  # float32 rounding: 1.19e-7 relative


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_offloaded_model_edits_exactly_like_the_plain_one(tiny_assets, tmp_path):
    plain = load_model(str(tiny_assets.model_dir), cache_dir=tmp_path / "c1")
    budget = int(0.3 * _model_bytes(plain.model))  # most of the model cannot stay in memory
    big = load_model(str(tiny_assets.model_dir), cache_dir=tmp_path / "c2", device_map="auto",
                     max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    where = placement_summary(big.model)
    assert where.get("meta", {}).get("parameters", 0) > 0, where  # really offloaded
    assert "disk" in big.model.hf_device_map.values()
    assert big.base_hash == plain.base_hash  # hashed from the files, not the placeholders
    specs = select_weights(plain.model, ["auto"])
    for s in specs:  # the edited weights stay resident
        assert big.model.get_parameter(s.name).device.type == "cpu"
    editor = MendEditor.load(tiny_assets.editor_dir, specs)
    d_plain = editor.edit(plain.model, plain.tokenizer, PROMPTS, TARGETS)
    d_big = editor.edit(big.model, big.tokenizer, PROMPTS, TARGETS)
    for name, layer in d_plain.layers.items():
        got, want = d_big.layers[name].to_dense(), layer.to_dense()
        # the offloaded model computes with the same float32 weights: the same ΔW up to the
        # order of float32 sums, a few eps32 × its largest entry (measured: identical; 64
        # eps32 allowed; an edit computed at other weights differs by O(max |ΔW|))
        err, tol = float((got - want).abs().max()), 64 * EPS32 * float(want.abs().max())
        assert err <= tol, (name, err, tol)


def test_base_hash_is_the_same_in_bf16(tiny_assets, tmp_path):
    plain = load_model(str(tiny_assets.model_dir), cache_dir=tmp_path / "c1")
    half = load_model(str(tiny_assets.model_dir), cache_dir=tmp_path / "c2", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.base_hash == plain.base_hash


def test_device_map_pins_the_edited_blocks(tiny_assets):
    n_layers = 4  # the tiny model's depth (tests/e2e_helpers.py); `auto` edits the last 3
    explicit = {"model.embed_tokens": "disk", **{f"model.layers.{i}": "disk" for i in range(n_layers)},
                "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dmap = plan_device_map(tiny_assets.model_dir, torch.float32, explicit, None, ["auto"])
    assert main_device(dmap) == "cpu"
    assert all(dmap[f"model.layers.{i}"] == "cpu" for i in range(1, n_layers))  # edited: pinned
    assert dmap["model.embed_tokens"] == "disk" and dmap["model.layers.0"] == "disk"
    with pytest.raises(ModelError, match="device_map"):
        plan_device_map(tiny_assets.model_dir, torch.float32, "everywhere", None, ["auto"])


def test_edit_in_an_offloaded_workspace_records_the_plain_state(tiny_assets, tmp_path):
    """The ledger does not depend on placement: the same edit in a workspace whose model is
    mostly on disk records the same state hash as in a plain workspace."""
    from mendctl.editors.data import EditCase
    from mendctl.workspace import Workspace

    cache = tmp_path / "cache"
    cache.mkdir()
    budget = int(0.3 * _model_bytes(load_model(str(tiny_assets.model_dir), cache_dir=cache).model))
    hashes = []
    for name, extra in [("plain", {}), ("big", {"device_map": "auto", "max_memory": {"cpu": budget},
                                                 "offload_folder": "offload"})]:
        w = init_workspace_inprocess(tmp_path / name, tiny_assets, cache, **extra)
        ws = Workspace.open(str(w.root))
        r = edit(ws, [EditCase(input=PROMPTS[0], target=TARGETS[0])], command="test")
        hashes.append(r["state_hash"])
        if name == "big":
            assert (w.root / "offload").is_dir()
    assert hashes[0] == hashes[1]


def test_bad_placement_config_is_refused(fresh_ws):
    from mendctl.config import load

    fresh_ws.write_config(max_memory={"cpu": "1GiB"})
    with pytest.raises(ConfigError, match="device_map"):
        load(fresh_ws.root / "mendctl.yaml")
    fresh_ws.write_config(max_memory=None, device_map="everywhere")
    with pytest.raises(ConfigError, match="device_map"):
        load(fresh_ws.root / "mendctl.yaml")
