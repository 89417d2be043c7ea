"""The package installs as a wheel (non-editable) and works from any directory: the
sub-packages editors and migrations live inside the mendctl namespace (src/mendctl/), migrations
and shipped files are found, and nothing named `editors` or `migrations` is put on sys.path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.util, json, sys
from importlib import resources
import mendctl, mendctl.editors.mend.editor, mendctl.migrations
from mendctl.ledger import Ledger
out = {
  "mendctl": mendctl.__file__,
  "top_level_editors": importlib.util.find_spec("editors") is not None,
  "top_level_migrations": importlib.util.find_spec("migrations") is not None,
  "versions": sorted(p.name for p in (resources.files("mendctl.migrations") / "versions").iterdir()
                     if p.name.endswith(".py")),
  "generic_text": (resources.files("mendctl.editors.data") / "resources" / "generic_text.txt").is_file(),
  "checkpoints": sorted(p.name for p in (resources.files("mendctl.editors") / "checkpoints").iterdir()
                        if p.is_dir()) if (resources.files("mendctl.editors") / "checkpoints").is_dir() else [],
}
led = Ledger(sys.argv[1]).open()
out["revision"] = led.current_revision()
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_wheel_install_works_from_any_directory(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                        "--quiet", "--target", str(target), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c", CHECK, str(elsewhere / "l.db")],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mendctl"].startswith(str(target))
    assert not out["top_level_editors"] and not out["top_level_migrations"]
    assert {"0001_initial.py", "0002_chains.py", "0003_typed_notes.py"} <= set(out["versions"])
    assert out["generic_text"]
    assert "smollm2-135m" in out["checkpoints"]
    assert out["revision"] == "0003"  # the newest migration, found in the installed package
    # the wheel carries the shipped editor's files, not just the folder
    ck = target / "mendctl" / "editors" / "checkpoints" / "smollm2-135m"
    assert (ck / "editor.json").is_file() and (ck / "editor.safetensors").is_file()
