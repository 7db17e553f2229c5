"""Instruction data (harness.data.instruct, harness.data.packing): which tokens are trained, how
examples are packed into rows, and bad data as one-line errors that cache nothing. Real
tokenizers (SmolLM2's chat template, GPT-2's BPE)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.config import DataConfig
from harness.data.corpus import load_tokenizer
from harness.data.instruct import chat_example, prompt_completion_example
from harness.data.packing import IGNORE, best_fit_decreasing, instruction_rows
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[2]
SMOL = "bundled:smollm2-135m"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a play."},
    {"role": "assistant", "content": "Hamlet."},
]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(SMOL)


def _trained_runs(tokenizer, ids, trained) -> list[str]:
    runs, current = [], []
    for token, flag in zip(ids, trained):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_the_assistant_turns_and_their_end_of_turn_are_trained(smol):
    ids, trained = chat_example(smol, CONVERSATION, "assistant", "row 1")
    assert ids == smol.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert _trained_runs(smol, ids, trained) == ["Hello! How can I help?<|im_end|>\n", "Hamlet.<|im_end|>\n"]
    ids_all, trained_all = chat_example(smol, CONVERSATION, "all", "row 1")
    assert ids_all == ids and all(trained_all)


def test_string_prompt_completion_is_rendered_as_a_chat_turn_by_default(smol):
    """data.prompt_template=chat: what apply_chat_template makes of one user and one assistant
    turn, as the model is prompted at inference (SmolLM2's template adds its default system
    turn), trained on the assistant's answer and its end of turn."""
    ids, trained = prompt_completion_example(smol, "Which play has a ghost?", "Hamlet.", "assistant", "row 1")
    turns = [{"role": "user", "content": "Which play has a ghost?"}, {"role": "assistant", "content": "Hamlet."}]
    assert smol.decode(ids) == smol.apply_chat_template(turns, tokenize=False)
    prompt = smol.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    assert smol.decode(ids).startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    assert _trained_runs(smol, ids, trained) == ["Hamlet.<|im_end|>\n"]


def test_prompt_template_none_joins_the_strings_as_text(smol):
    ids, trained = prompt_completion_example(smol, "Which play has a ghost?", " Hamlet.", "assistant", "row 1",
                                             template="none")
    assert _trained_runs(smol, ids, trained) == [" Hamlet.<|im_end|>"]
    assert smol.decode(ids) == "Which play has a ghost? Hamlet.<|im_end|>"


def test_a_tokenizer_without_chat_template_joins_the_strings(tmp_path):
    gpt2 = load_tokenizer("bundled:gpt2")
    ids, _ = prompt_completion_example(gpt2, "What is 55-25?", " 30", "assistant", "row 1")
    assert gpt2.decode(ids) == "What is 55-25? 30<|endoftext|>"


def test_conversational_prompt_completion_trains_the_completion_turns(smol):
    chat_ids, chat_trained = prompt_completion_example(smol, CONVERSATION[:4], CONVERSATION[4:], "assistant", "row 1")
    assert _trained_runs(smol, chat_ids, chat_trained) == ["Hamlet.<|im_end|>\n"]
    assert smol.decode(chat_ids) == smol.apply_chat_template(CONVERSATION, tokenize=False)


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 100, 500)
    rows = best_fit_decreasing(lengths, 128)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(500))
    assert max(lengths[row].sum() for row in rows) <= 128
    assert len(rows) <= int(np.ceil(lengths.sum() / 128 * 1.1))  # within 10% of the floor


def _write_rows(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _cfg(tmp_path: Path, path: str, **kw) -> DataConfig:
    return DataConfig(path=path, format=kw.pop("format", "chat"), tokenizer=SMOL, cache_dir=str(tmp_path / "cache"),
                      val_fraction=kw.pop("val_fraction", 0.25), **kw)


def _chat_rows(count: int) -> list:
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} " * (i % 7 + 1)}]}
            for i in range(count)]


@pytest.mark.parametrize("pack", [True, False])
def test_rows_restart_positions_and_never_train_an_example_start(tmp_path, pack):
    cfg = _cfg(tmp_path, _write_rows(tmp_path / "chat.jsonl", _chat_rows(40)), pack=pack)
    train, val, examples = instruction_rows(cfg, seq_len=256, eval_examples=100)
    assert val.examples_in_rows == 10 and train.examples_in_rows == 30
    batch = train.batch(np.arange(len(train)))
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    starts, ends = examples.starts, examples.ends
    for r in range(len(train)):
        column = 0
        for example in train.examples_of(r):
            size = ends[example] - starts[example]
            np.testing.assert_array_equal(ids[r, column:column + size], examples.tokens[starts[example]:ends[example]])
            assert labels[r, column] == IGNORE
            trained = examples.trained[starts[example]:ends[example]].astype(bool)
            trained[0] = False
            np.testing.assert_array_equal(labels[r, column:column + size] != IGNORE, trained)
            if pack:
                np.testing.assert_array_equal(batch["position_ids"][r, column:column + size].numpy(), np.arange(size))
            column += size
        assert (labels[r, column:] == IGNORE).all()
    assert ("position_ids" in batch) == pack
    efficiency = train.packing_efficiency(np.arange(len(train)))
    placed = [e for r in range(len(train)) for e in train.examples_of(r)]
    assert sorted(placed) == sorted(set(placed)) and len(placed) == 30
    assert efficiency == pytest.approx(sum(ends[e] - starts[e] for e in placed) / (len(train) * 256))
    if pack:
        assert len(train) < 30 and efficiency > 0.5
    else:
        assert len(train) == 30


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    rows = _chat_rows(6) + [{"messages": [{"role": "user", "content": "long " * 20},
                                          {"role": "assistant", "content": "yes " * 80}]}]
    path = _write_rows(tmp_path / "chat.jsonl", rows)
    _, _, kept = instruction_rows(_cfg(tmp_path, path), seq_len=100, eval_examples=4)
    assert kept.index["truncated"] == 1 and kept.index["examples"] == 7 and max(kept.lengths) == 100
    _, _, dropped = instruction_rows(_cfg(tmp_path, path, overlong="drop"), seq_len=100, eval_examples=4)
    assert dropped.index["dropped_overlong"] == 1 and dropped.index["examples"] == 6
    # An example whose assistant turn lies wholly past the cut has nothing left to train on.
    late = [{"messages": [{"role": "user", "content": "long " * 120}, {"role": "assistant", "content": "yes"}]}]
    _, _, cut = instruction_rows(_cfg(tmp_path, _write_rows(tmp_path / "late.jsonl", _chat_rows(4) + late)),
                                 seq_len=100, eval_examples=4)
    assert cut.index["dropped_untrained"] == 1 and cut.index["truncated"] == 0 and cut.index["examples"] == 4


def test_conversations_without_an_assistant_turn_are_dropped_and_counted(tmp_path):
    silent = {"messages": [{"role": "user", "content": "Anyone?"}]}
    path = _write_rows(tmp_path / "chat.jsonl", _chat_rows(5) + [silent, silent])
    _, _, examples = instruction_rows(_cfg(tmp_path, path), seq_len=64, eval_examples=4)
    assert examples.index["dropped_untrained"] == 2 and examples.index["examples"] == 5
    _, _, everything = instruction_rows(_cfg(tmp_path, path, train_on="all"), seq_len=64, eval_examples=4)
    assert everything.index["examples"] == 7


NO_ASSISTANT_TEMPLATE = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"


@pytest.mark.parametrize("case", [
    "no-messages", "unknown-role", "nothing-left", "no-span", "plain-text", "no-template", "missing-template-file",
    "no-prompt",
])
def test_bad_instruction_data_is_one_line_and_caches_nothing(tmp_path, case):
    kw: dict = {}
    tokenizer = SMOL
    if case == "no-messages":
        path, want = _write_rows(tmp_path / "x.jsonl", [{"conversation": []}]), "has no 'messages' (columns: conversation)"
    elif case == "unknown-role":
        rows = _chat_rows(2) + [{"messages": [{"role": "narrator", "content": "Once"}]}]
        path, want = _write_rows(tmp_path / "x.jsonl", rows), "x.jsonl, line 3: message 1 has unknown role"
    elif case == "nothing-left":
        path, want = _write_rows(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}] * 3), \
            "left no example to train on: of 3 rows, 3 dropped with nothing to train on"
    elif case == "no-span":
        template = tmp_path / "t.jinja"
        template.write_text(NO_ASSISTANT_TEMPLATE)
        path, want = _write_rows(tmp_path / "x.jsonl", _chat_rows(3)), "renders no assistant span"
        kw["chat_template"] = str(template)
    elif case == "plain-text":
        (tmp_path / "x.txt").write_text("just some prose\n")
        path, want = str(tmp_path / "x.txt"), "is plain text; use data.format=text"
    elif case == "no-template":
        path, want, tokenizer = _write_rows(tmp_path / "x.jsonl", _chat_rows(3)), "has no chat template", "bundled:gpt2"
    elif case == "missing-template-file":
        path, want = _write_rows(tmp_path / "x.jsonl", _chat_rows(3)), "data.chat_template"
        kw["chat_template"] = str(tmp_path / "nowhere.jinja")
    else:
        path, want = _write_rows(tmp_path / "x.jsonl", [{"prompt": "a"}]), "has no 'completion'"
        kw["format"] = "prompt_completion"
    cfg = _cfg(tmp_path, path, **kw)
    cfg.tokenizer = tokenizer
    with pytest.raises(HarnessError) as caught:
        instruction_rows(cfg, seq_len=64, eval_examples=4)
    assert want in str(caught.value) and "\n" not in str(caught.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith("examples-") and p.is_dir()]


def test_prepare_data_cli_reports_the_examples_and_exits_2_on_bad_rows(tmp_path):
    good = _write_rows(tmp_path / "good.jsonl", _chat_rows(12))
    bad = _write_rows(tmp_path / "bad.jsonl", [{"text": "no messages here"}])
    common = [f"data.cache_dir={tmp_path / 'cache'}", "data.format=chat", "train.seq_len=64"]
    cmd = [sys.executable, "-m", "harness", "prepare-data", str(ROOT / "configs" / "smollm2-135m-sft.yaml"), *common]
    ok = subprocess.run([*cmd, f"data.path={good}", "--show", "2"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "12 examples of 12 rows" in ok.stdout and "none truncated or dropped" in ok.stdout
    # --show: the examples as the model sees them, the assistant turn (and its end of turn) marked.
    assert "--- example 1 (" in ok.stdout and "--- example 3" not in ok.stdout
    assert "<|im_start|>user\nSay 1.<|im_end|>\n<|im_start|>assistant\n[[1 1 <|im_end|>\n]]" in ok.stdout
    failed = subprocess.run([*cmd, f"data.path={bad}"], capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().count("\n") == 0 and "has no 'messages'" in failed.stderr


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_json_and_parquet_rows_prepare_the_same_examples_as_jsonl(tmp_path, kind):
    rows = _chat_rows(9)
    jsonl = _write_rows(tmp_path / "chat.jsonl", rows)
    if kind == "json":
        other = tmp_path / "chat.json"
        other.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        other = tmp_path / "chat.parquet"
        pq.write_table(pa.Table.from_pylist(rows), other)
    _, _, want = instruction_rows(_cfg(tmp_path, jsonl), seq_len=256, eval_examples=4)
    _, _, got = instruction_rows(_cfg(tmp_path, str(other)), seq_len=256, eval_examples=4)
    assert got.index["examples"] == 9
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.trained), np.asarray(want.trained))


@pytest.mark.parametrize("kind", ["dataset", "dataset_dict", "arrow_file"])
@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_save_to_disk_rows_prepare_the_same_examples_as_jsonl(tmp_path, kind, fmt):
    from tests.data.test_data import _saved

    rows = _chat_rows(9) if fmt == "chat" else [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(9)]
    jsonl = _write_rows(tmp_path / "rows.jsonl", rows)
    saved = _saved(tmp_path, rows, kind)
    _, _, want = instruction_rows(_cfg(tmp_path, jsonl, format=fmt), seq_len=256, eval_examples=4)
    _, _, got = instruction_rows(_cfg(tmp_path, saved, format=fmt), seq_len=256, eval_examples=4)
    assert got.index["examples"] == 9
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.trained), np.asarray(want.trained))


def test_a_huge_message_is_tokenized_only_as_far_as_a_row_can_hold(tmp_path, smol, monkeypatch):
    huge = "All the world's a stage, and all the men and women merely players. " * 40_000  # 2.7 MB
    rows = [{"messages": [{"role": "user", "content": "Recite."}, {"role": "assistant", "content": huge}]}]
    path = _write_rows(tmp_path / "huge.jsonl", _chat_rows(3) + rows)
    whole_ids, whole_trained = chat_example(smol, rows[0]["messages"], "assistant", "row 4")
    lengths = []
    real_call = type(smol).__call__

    def call(self, text, *args, **kwargs):
        lengths.append(len(text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(smol), "__call__", call)
    cfg = _cfg(tmp_path, path)
    monkeypatch.setattr("harness.data.corpus.load_tokenizer", lambda ref: smol)  # the one counting its calls
    _, _, examples = instruction_rows(cfg, seq_len=128, eval_examples=2)
    assert max(lengths) < 128 * 100 < len(huge)
    assert examples.index["truncated"] == 1
    last = slice(int(examples.starts[-1]), int(examples.ends[-1]))
    np.testing.assert_array_equal(np.asarray(examples.tokens[last]), whole_ids[:128])
    np.testing.assert_array_equal(np.asarray(examples.trained[last]).astype(bool), whole_trained[:128])


RAISING_TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'BAD' %}{{ raise_exception('no BAD turns') }}{% endif %}"
                    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GOOD_LINE = json.dumps(_chat_rows(1)[0])
# (case, the second line of a JSONL file, what its one line says); line 1 is a good row.
BAD_ROWS = [
    ("content missing", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "Hi"}]}',
     "line 2: message 1 (user) has no 'content'"),
    ("content not a string", '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "Hi"}]}',
     "line 2: message 1 (user) has content that is int, not a string"),
    ("content null", '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}]}',
     "line 2: message 2 (assistant) has content that is null"),
    ("messages not a list", '{"messages": "Hi"}', "line 2: messages must be a non-empty list of {role, content}, got str"),
    ("messages null", '{"messages": null}', "got null"),
    ("message not an object", '{"messages": ["Hi"]}', "line 2: message 1 must be a {role, content} object"),
    ("row null", "null", "line 2 is null, not an object of columns"),
    ("row a list", "[1, 2]", "line 2 is a JSON list, not an object of columns"),
    ("not JSON", '{"messages": [', "line 2 is not JSON"),
    ("template refuses", '{"messages": [{"role": "user", "content": "BAD"}, {"role": "assistant", "content": "x"}]}',
     "line 2: the chat template cannot render this conversation (no BAD turns)"),
    ("empty file", None, "is empty"),
]


@pytest.mark.parametrize("case", BAD_ROWS, ids=[case[0] for case in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_its_file_and_line_everywhere(tmp_path, capsys, case):
    """Preparing (what training runs), `harness prepare-data` and `harness check`: the same one
    line, exit 2, and nothing cached."""
    from harness.cli.check import main as check
    from harness.cli.prepare_data import main as prepare_data

    _, line, want = case
    data = tmp_path / "chat.jsonl"
    data.write_text("" if line is None else f"{GOOD_LINE}\n{line}\n{GOOD_LINE}\n")
    template = tmp_path / "t.jinja"
    template.write_text(RAISING_TEMPLATE)
    cfg = _cfg(tmp_path, str(data), chat_template=str(template))
    with pytest.raises(HarnessError) as caught:
        instruction_rows(cfg, seq_len=64, eval_examples=4)
    message = str(caught.value)
    assert want in message and "\n" not in message and (line is None or f"data file {data}, line 2" in message)
    overrides = [f"data.path={data}", "data.format=chat", f"data.chat_template={template}", "train.seq_len=64",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    config = str(ROOT / "configs" / "smollm2-135m-sft.yaml")
    capsys.readouterr()
    assert prepare_data([config, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and want in err and "Traceback" not in err
    assert check([config, *overrides, "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert any(want in finding for finding in err.splitlines()), err
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith("examples-") and p.is_dir()]


def test_check_reads_every_row_and_reports_each_bad_one(tmp_path, capsys):
    from harness.cli.check import main as check

    lines = [GOOD_LINE] * 30
    lines[7] = '{"messages": [{"role": "user"}]}'
    lines[21] = '{"messages": [{"role": "user", "content": ["Hi"]}]}'
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code = check([str(ROOT / "configs" / "smollm2-135m-sft.yaml"), f"data.path={data}", "train.seq_len=64",
                  "--world-size", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"data file {data}, line 8: message 1 (user) has no 'content'" in err
    assert f"data file {data}, line 22: message 1 (user) has content that is list" in err
    data.write_text("\n".join([GOOD_LINE] * 30) + "\n")
    assert check([str(ROOT / "configs" / "smollm2-135m-sft.yaml"), f"data.path={data}", "train.seq_len=64",
                  "data.pack=true", "--world-size", "2"]) == 0
    assert "all 30 rows read as training reads them" in capsys.readouterr().out
