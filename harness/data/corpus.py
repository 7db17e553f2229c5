"""A config's corpus: every source's prepared token stream, split into train and validation, and
the sequences (one source, or a weighted mixture) the trainer draws from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness import assets
from harness.config import DataConfig
from harness.data.order import MixedSequences, PackedSequences
from harness.data.stream import TokenStream
from harness.errors import HarnessError, first_line


@dataclass
class CorpusPart:
    """One source's token stream, split into train and its validation tail."""

    name: str
    weight: float
    train: TokenStream
    val: TokenStream


@dataclass
class TokenCorpus:
    parts: list[CorpusPart]
    vocab_size: int
    """len(tokenizer): every token id is below this."""
    description: str
    digest: Optional[str] = None
    """sha256 of the token streams (prepared corpora): ranks compare it."""
    folders: list[str] = field(default_factory=list)
    """Where each source's tokens are (for `harness prepare-data`'s report)."""

    @property
    def train(self) -> TokenStream:
        """The training stream of a single-source corpus."""
        return self.parts[0].train

    @property
    def val(self) -> TokenStream:
        return self.parts[0].val

    def tokens(self, split: str) -> int:
        return sum(len(getattr(part, split)) for part in self.parts)

    def sequences(self, split: str, seq_len: int):
        """PackedSequences of one source, or the weighted MixedSequences of several."""
        packed = [PackedSequences(getattr(part, split), seq_len) for part in self.parts]
        if len(self.parts) == 1:
            return packed[0]
        for part, sequences in zip(self.parts, packed):
            if len(sequences) == 0:
                raise HarnessError(
                    f"data source {part.name!r} has no {split} sequence of {seq_len + 1} tokens; "
                    "give it more text, or lower train.seq_len"
                )
        return MixedSequences(packed, [part.weight for part in self.parts], [part.name for part in self.parts])


def load_tokenizer(ref: str):
    """AutoTokenizer for data.tokenizer; an empty one (a DataConfig on its own, with no model to
    take the tokenizer from) is bundled:gpt2, as Config.tokenizer_ref() has it."""
    from transformers import AutoTokenizer

    ref = ref or "bundled:gpt2"
    resolved = assets.resolve_tokenizer(ref)
    if assets.looks_like_a_path(resolved) and not Path(resolved).expanduser().is_dir():
        raise HarnessError(f"data.tokenizer {ref!r} could not be loaded: no such folder; point it at a tokenizer "
                           "folder, bundled:gpt2 or a hub id")
    offline = not Path(resolved).expanduser().is_dir() and not assets.hub_reachable()
    try:
        return AutoTokenizer.from_pretrained(resolved, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if offline:
            raise HarnessError(f"data.tokenizer {ref!r} is not a local folder, the hub cannot be reached from this "
                               "machine and its cache has no copy; point data.tokenizer (or model.pretrained) at a "
                               "local folder with the tokenizer's files") from None
        raise HarnessError(
            f"data.tokenizer {ref!r} could not be loaded ({first_line(exc)}); use bundled:gpt2 or a local folder"
        ) from None


def load_corpus(cfg: DataConfig, show_progress: bool = True, log=print) -> TokenCorpus:
    """Every source's prepared token stream (prepared now if the cache lacks it), each split into
    train and its validation tail."""
    import hashlib

    tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer_path = str(assets.resolve_tokenizer(cfg.tokenizer or "bundled:gpt2"))
    if cfg.sources:
        specs = [(s.display_name(), s.weight, s.path, s.format, s.text_field or cfg.text_field) for s in cfg.sources]
    else:
        specs = [("", 1.0, cfg.path, cfg.format, cfg.text_field)]
    parts, folders, digests, described = [], [], [], []
    for name, weight, path, fmt, text_field in specs:
        stream, digest, folder, what = _load_source(cfg, tokenizer, tokenizer_path, name, path, fmt, text_field,
                                                    show_progress, log)
        n_val = int(len(stream) * cfg.val_fraction)
        split = len(stream) - n_val
        parts.append(CorpusPart(name or path, weight, stream.view(0, split), stream.view(split, len(stream))))
        folders.append(folder)
        digests.append((name, weight, digest))
        described.append(f"{name}={weight:g}: {what}" if name else what)
    digest = digests[0][2] if len(digests) == 1 else hashlib.sha256(repr(digests).encode()).hexdigest()
    description = described[0] if len(described) == 1 else "mixture of " + "; ".join(described)
    return TokenCorpus(parts, len(tokenizer), description, digest, folders)


def _load_source(cfg: DataConfig, tokenizer, tokenizer_path: str, name: str, path: str, fmt: str, text_field: str,
                 show_progress: bool, log) -> tuple[TokenStream, str, str, str]:
    from harness.data.prepare import prepare
    from harness.data.sources import find_source
    from harness.data.stream import open_token_file

    if fmt == "tokens":
        from harness.data.prepare import cache_dir

        stream = open_token_file(path, cfg.token_dtype, len(tokenizer), cache_dir(cfg) / "checked")
        return stream, f"tokens:{path}:{len(stream)}", f"{path} (used as it is)", \
            f"{path} (prepared tokens, {len(stream):,} tokens)"
    source = find_source(cfg, path, fmt, text_field)
    prepared = prepare(cfg, source, tokenizer, tokenizer_path, name=name or path, show_progress=show_progress, log=log)
    index = prepared.index
    folder = f"{prepared.folder} ({len(index['shards'])} shard(s), {index['documents']:,} documents)"
    return prepared.stream, index["stream_sha256"], folder, \
        f"{path} ({len(source.files) or 'hub'} files, {len(prepared.stream):,} tokens)"
