"""mendctl.yaml parsing and workspace discovery (no model needed)."""
from pathlib import Path

import pytest
import yaml

from mendctl import config as config_mod
from mendctl.config import TEMPLATE, Config
from mendctl.errors import ConfigError, WorkspaceError
from mendctl.workspace import ENV_WORKSPACE, Workspace

REPO = Path(__file__).resolve().parents[1]


def test_repository_example_is_the_template_and_parses_to_defaults():
    assert (REPO / "mendctl.yaml").read_text() == TEMPLATE
    assert config_mod.parse(yaml.safe_load(TEMPLATE), "mendctl.yaml") == Config()


def test_every_key_is_declared_once_with_its_help_and_types():
    """The template is written from Config's fields: each key appears once, under a comment,
    and a value given to `template` is what the file then says."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(Config)]
    lines = TEMPLATE.splitlines()
    keys = [line.split(":")[0] for line in lines if line and not line.startswith("#")]
    assert keys == names
    assert dataclasses.fields(Config)[0].metadata["doc"]  # the first key opens a comment block
    for f in dataclasses.fields(Config):
        assert f.metadata["types"], f.name
    text = config_mod.template(model="org/some model", routing=False)
    cfg = config_mod.parse(yaml.safe_load(text), "t")
    assert (cfg.model, cfg.routing) == ("org/some model", None)
    assert text.replace('model: "org/some model"', "model: smollm2-135m").replace(
        "\nrouting: false\n", "\nrouting: true\n") == TEMPLATE
    with pytest.raises(ValueError, match="not config keys: modle"):
        config_mod.template(modle="x")


@pytest.mark.parametrize("data, words", [
    ({"modle": "x"}, ["unknown key `modle`", "known keys"]),
    ({"seed": "zero"}, ["`seed` must be int"]),
    ({"seed": True}, ["`seed` must be int"]),
    ({"lock_timeout": -1}, ["`lock_timeout`"]),
    ({"prompt_format": "markdown"}, ["`prompt_format`", "raw or chat"]),
    ({"device": "gpu"}, ["`device`"]),
    ({"edit_weights": []}, ["`edit_weights`"]),
    ({"edit_weights": ["re:("]}, ["bad regular expression"]),
    ({"edit_weights": [3]}, ["list of strings"]),
    (["a", "b"], ["mapping"]),
    ({"routing": {"confidence": 1.5}}, ["`routing`", "confidence", "probability in (0, 1)"]),
    ({"routing": {"contexts": "The following is true. "}}, ["`routing`", "contexts", "list of"]),
    ({"routing": {"contexts": ["  "]}}, ["`routing`", "contexts", "non-empty prefixes"]),
])
def test_bad_config_names_key_and_file(data, words):
    with pytest.raises(ConfigError) as e:
        config_mod.parse(data, "/x/mendctl.yaml")
    msg = str(e.value)
    assert "/x/mendctl.yaml" in msg
    for w in words:
        assert w in msg


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "mendctl.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_mod.load(p)


def test_routing_contexts_default_and_none():
    """`routing: true` learns each edit under the shipped contexts; `contexts: []` or null
    under none (the prompt alone, as entries made before the setting were)."""
    assert config_mod.parse({"routing": True}, "f").routing["contexts"] == \
        config_mod.ROUTING_DEFAULTS["contexts"] != []
    for none in ([], None):
        assert config_mod.parse({"routing": {"contexts": none}}, "f").routing["contexts"] == []


def test_edit_weights_accepts_a_single_string():
    assert config_mod.parse({"edit_weights": "auto"}, "f").edit_weights == ["auto"]


def test_locate_explicit_env_and_upwards(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_WORKSPACE, raising=False)
    root = Workspace.init(tmp_path / "ws")
    assert (root / ".mendctl").is_dir()
    deep = root / "a" / "b"
    deep.mkdir(parents=True)
    assert Workspace.locate(cwd=deep) == root
    assert Workspace.locate(str(root)) == root
    assert Workspace.locate(str(root / "mendctl.yaml")) == root
    monkeypatch.setenv(ENV_WORKSPACE, str(root))
    assert Workspace.locate(cwd=tmp_path) == root
    monkeypatch.setenv(ENV_WORKSPACE, str(tmp_path))
    with pytest.raises(WorkspaceError, match="mendctl init"):
        Workspace.locate(cwd=tmp_path)


def test_no_workspace_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_WORKSPACE, raising=False)
    with pytest.raises(WorkspaceError, match="mendctl init"):
        Workspace.locate(cwd=tmp_path)


def test_init_refuses_to_overwrite_without_force(tmp_path):
    root = Workspace.init(tmp_path / "ws", model="./my-model")
    assert config_mod.load(root / "mendctl.yaml").model == "./my-model"
    with pytest.raises(WorkspaceError, match="--force"):
        Workspace.init(root)
    Workspace.init(root, force=True)
    assert config_mod.load(root / "mendctl.yaml").model == "smollm2-135m"
