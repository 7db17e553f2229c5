"""Data: real files through datasets + AutoTokenizer, packing, and the world-size-free global order."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from harness.config import DataConfig
from harness.data import BatchShape, PackedSequences, TrainBatches, eval_batches, load_corpus
from harness.errors import HarnessError

SPLITS = [(1, 4, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2), (4, 1, 1)]  # (world, micro, accum), global batch 4


def _sequences(n_tokens: int = 1000, seq_len: int = 8) -> PackedSequences:
    return PackedSequences(np.arange(n_tokens, dtype=np.uint16), seq_len)


def _step_sets(seed: int, step: int) -> list[Counter]:
    sets = []
    seqs = _sequences()
    for world, micro, accum in SPLITS:
        shape = BatchShape(micro, accum, world)
        seen = Counter()
        for rank in range(world):
            batches = TrainBatches(seqs, seed, shape, rank).micro_batches(step)
            assert len(batches) == accum and all(b.shape == (micro, 9) for b in batches)
            for b in batches:
                seen.update(int(row[0]) // 8 for row in b)
        sets.append(seen)
    return sets


@pytest.mark.parametrize("step", [1, 2, 17, 40])
def test_global_batch_is_the_same_for_any_world_size_and_split(step):
    sets = _step_sets(seed=3, step=step)
    assert all(s == sets[0] for s in sets)
    assert sum(sets[0].values()) == 4 and max(sets[0].values()) == 1  # ranks' shards are disjoint


def test_order_depends_on_seed_and_is_deterministic():
    seqs = _sequences()
    shape = BatchShape(2, 1, 2)
    a = TrainBatches(seqs, 0, shape, 0).global_indices(5)
    b = TrainBatches(seqs, 0, shape, 0).global_indices(5)
    c = TrainBatches(seqs, 1, shape, 0).global_indices(5)
    assert list(a) == list(b) and list(a) != list(c)


def test_an_epoch_visits_every_sequence_once_then_reshuffles():
    seqs = _sequences(n_tokens=81, seq_len=8)  # 10 sequences
    assert len(seqs) == 10
    batches = TrainBatches(seqs, 0, BatchShape(1, 1, 2), 0)
    first = np.concatenate([batches.global_indices(s) for s in range(1, 6)])
    second = np.concatenate([batches.global_indices(s) for s in range(6, 11)])
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert list(first) != list(second)
    # A global batch that straddles the epoch boundary takes the tail of one, head of the next.
    odd = TrainBatches(seqs, 0, BatchShape(3, 1, 1), 0)
    stream = np.concatenate([odd.global_indices(s) for s in range(1, 5)])  # 12 positions
    assert sorted(stream[:10]) == list(range(10))


def test_packing_is_inputs_plus_next_token():
    seqs = _sequences(n_tokens=50, seq_len=8)
    assert len(seqs) == 6  # (50 - 1) // 8
    batch = seqs.batch(np.array([0, 5]))
    assert batch.tolist()[0] == list(range(0, 9))
    assert batch.tolist()[1] == list(range(40, 49))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_set_is_the_same_for_any_world_size(world):
    seqs = _sequences()
    seen = Counter()
    counts = []
    for rank in range(world):
        batches = eval_batches(seqs, count=7, micro_batch_size=2, rank=rank, world_size=world)
        counts.append(len(batches))
        for batch, weights in batches:
            for row, w in zip(batch, weights):
                if w > 0:
                    seen[int(row[0]) // 8] += 1
    assert seen == Counter(range(7))
    assert len(set(counts)) == 1  # same number of forward passes on every rank


def _write_corpus(tmp_path, kind: str):
    texts = [f"Document {i}: to be or not to be, that is question number {i}.\n" * 20 for i in range(6)]
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "text":
        for i, t in enumerate(texts):
            (folder / f"doc{i}.txt").write_text(t)
    elif kind == "jsonl":
        (folder / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": texts}), folder / "docs.parquet")
    return folder, texts


def _saved(tmp_path, rows: list[dict], kind: str) -> str:
    """rows as `datasets` saves them: a Dataset folder, a DatasetDict folder (split train), or
    the .arrow file inside a Dataset folder."""
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    folder = tmp_path / f"saved-{kind}"
    if kind == "dataset_dict":
        datasets.DatasetDict({"train": dataset, "test": dataset.select(range(1))}).save_to_disk(str(folder))
        return str(folder)
    dataset.save_to_disk(str(folder))
    if kind == "arrow_file":
        (arrow,) = folder.glob("*.arrow")
        return str(arrow)
    return str(folder)


@pytest.mark.parametrize("kind", ["dataset", "dataset_dict", "arrow_file"])
def test_a_save_to_disk_folder_and_its_arrow_files_are_read_as_rows(tmp_path, kind):
    """data.format=text over saved rows reads their text column, as for jsonl (the chat and
    prompt/completion formats: tests/data/test_instruct.py)."""
    folder, texts = _write_corpus(tmp_path, "jsonl")
    saved = _saved(tmp_path, [{"body": t, "other": 1} for t in texts], kind)
    want = load_corpus(DataConfig(path=str(folder), text_field="body", val_fraction=0.1, cache_dir=str(tmp_path / "a")))
    for fmt in ("auto", "text"):
        got = load_corpus(DataConfig(path=saved, format=fmt, text_field="body", val_fraction=0.1,
                                     cache_dir=str(tmp_path / f"b-{fmt}")))
        assert np.concatenate([got.train, got.val]).tolist() == np.concatenate([want.train, want.val]).tolist()


def test_a_saved_dataset_dict_without_the_split_names_its_splits(tmp_path):
    saved = _saved(tmp_path, [{"text": "a b c"}] * 4, "dataset_dict")
    with pytest.raises(HarnessError, match="without a 'validation' split \\(it has train, test\\); set data.split"):
        load_corpus(DataConfig(path=saved, split="validation", cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_local_files_tokenize_with_eos_between_documents(tmp_path, kind):
    from harness.data import load_tokenizer

    folder, texts = _write_corpus(tmp_path, kind)
    cfg = DataConfig(path=str(folder), text_field="body", val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    tok = load_tokenizer("bundled:gpt2")
    expected = []
    for t in texts:
        expected += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    everything = np.concatenate([corpus.train, corpus.val]).tolist()
    assert everything == expected
    assert len(corpus.val) == int(len(expected) * 0.1)
    assert corpus.vocab_size == 50257
    # The second load is served from the prepared folder.
    cached = list((tmp_path / "cache").glob("*/tokens-00000.bin"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = load_corpus(cfg)
    assert cached[0].stat().st_mtime_ns == mtime and len(again.train) == len(corpus.train)


def test_bundled_shakespeare_is_the_default(tmp_path):
    corpus = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    assert len(corpus.train) + len(corpus.val) > 1_500_000
    assert corpus.description.startswith("bundled:shakespeare (38 files")


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(path="./no/such/dir"), "does not exist"),
        (dict(path="/tmp/*.nothing-matches-this"), "matches no files"),
        (dict(path="bundled:poetry"), "unknown 'bundled:poetry'"),
        (dict(text_field="content"), "line 1 has no column data.text_field='content' (columns: body)"),
        (dict(tokenizer="./missing-tokenizer"), "data.tokenizer './missing-tokenizer' could not be loaded"),
    ],
)
def test_bad_data_configs_are_one_line_errors(tmp_path, cfg, message):
    folder, _ = _write_corpus(tmp_path, "jsonl")
    base = dict(path=str(folder), text_field="body", cache_dir=str(tmp_path / "cache"))
    base.update(cfg)
    if "text_field" in cfg:
        base["path"] = str(folder)
    with pytest.raises(HarnessError) as err:
        load_corpus(DataConfig(**base))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_too_little_data_for_one_global_batch():
    with pytest.raises(HarnessError, match="fewer than one global batch"):
        TrainBatches(_sequences(n_tokens=30, seq_len=8), 0, BatchShape(4, 1, 2), 0)


def test_prefetched_batches_are_the_same_batches_in_any_order():
    from harness.data import PrefetchedBatches

    seqs = _sequences(n_tokens=4000, seq_len=8)
    plain = TrainBatches(seqs, 3, BatchShape(2, 3, 2), 1)
    prefetched = PrefetchedBatches(TrainBatches(seqs, 3, BatchShape(2, 3, 2), 1), pin_memory=False)
    try:
        for step in [1, 2, 3, 7, 8, 2]:  # in order (prepared in the background), then jumps
            got, want = prefetched.micro_batches(step), plain.micro_batches(step)
            assert len(got) == len(want) == 3
            assert all(torch.equal(a, b) for a, b in zip(got, want)), step
    finally:
        prefetched.close()
