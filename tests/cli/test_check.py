"""`harness check`: each mistake that would fail inside the allocation is one line and exit 2,
before anything is queued or started; a config that fits says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli.check import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMOL = str(ROOT / "configs" / "smollm2-135m.yaml")


def _check(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith("harness: check: ")], captured.out


def test_a_config_that_fits_says_what_it_needs(capsys):
    code, findings, out = _check(capsys, TINY, "--world-size", "2")
    assert code == 0 and findings == []
    assert out.startswith(f"check ok: {TINY} on 2 rank(s): ") and "GiB per H100 SXM 80GB (fsdp2)" in out


@pytest.mark.parametrize("case", ["pretrained", "data", "resume", "seq_len", "tokenizer", "memory", "host", "lead",
                                  "deepspeed", "too_little_data", "few_examples"])
def test_each_mistake_is_one_line_and_exit_2(capsys, tmp_path, case):
    args = {
        "pretrained": [TINY, "model.pretrained=/nowhere/llama", "model.config={}", "--world-size", "2"],
        "data": [TINY, "data.path=/nowhere/corpus.txt", "--world-size", "2"],
        "resume": [TINY, "resume=/nowhere/step-00000100", "--world-size", "2"],
        "seq_len": [TINY, "train.seq_len=512", "--world-size", "2"],
        "tokenizer": [SMOL, "data.tokenizer=bundled:gpt2", "--world-size", "2"],
        "memory": [str(ROOT / "configs" / "llama-8b.yaml"), "train.micro_batch_size=2", "train.grad_accum=1",
                   "--world-size", "8"],
        "host": [str(ROOT / "configs" / "llama-70b.yaml"), "log.every=1", "--world-size", "8", "--host-gb", "512",
                 "--signal-seconds", "3600"],
        "lead": [str(ROOT / "configs" / "llama-70b.yaml"), "log.every=10", "slurm.signal_seconds=120", "--world-size", "8",
                 "--host-gb", "2000"],
        "deepspeed": [TINY, "parallel.backend=deepspeed", f"parallel.deepspeed_config={tmp_path / 'ds.json'}",
                      "--world-size", "2"],
        "too_little_data": [TINY, f"data.path={tmp_path / 'small.txt'}", "--world-size", "2"],
        "few_examples": [str(ROOT / "configs" / "smollm2-135m-sft.yaml"), f"data.path={tmp_path / 'chat.jsonl'}",
                         "data.pack=false", "data.val_fraction=0", "eval.every=0", "eval.prompts=[]", "--world-size", "2"],
    }[case]
    want = {
        "pretrained": "model.pretrained '/nowhere/llama' does not exist",
        "data": "data.path '/nowhere/corpus.txt' does not exist",
        "resume": "resume=/nowhere/step-00000100 does not exist",
        "seq_len": "train.seq_len=512 is beyond the model's 128 positions",
        "tokenizer": "data.tokenizer 'bundled:gpt2' has 50,257 tokens but model.pretrained 'bundled:smollm2-135m'",
        "memory": "the estimate needs 88.2 GiB per GPU (fsdp2, micro_batch_size 2 x seq_len 8192); a H100 SXM 80GB has 79.6",
        "host": "GiB of host memory per node (8 ranks: offloaded state and setup), more than the 512.0 GiB of --host-gb",
        "lead": "the stop signal comes 120 s before the time limit, but the ranks act on it only every log.every=10",
        "deepspeed": "zero_optimization.reduce_bucket_size=0 is rejected by DeepSpeed",
        "too_little_data": "fewer than one global batch",
        "few_examples": "holds 3 training examples, fewer than one global batch of 8 unpacked rows",
    }[case]
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(chat) for _ in range(3)) + "\n")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 0}}))
    (tmp_path / "small.txt").write_text("To be, or not to be.\n")
    code, findings, out = _check(capsys, *args)
    assert code == 2 and out == ""
    assert len(findings) == 2, findings  # the finding, and the count of them
    assert want in findings[0]
    assert findings[1].endswith("1 problem(s) in " + args[0] + "; nothing was started")


def test_every_finding_is_reported_at_once(capsys):
    code, findings, _ = _check(capsys, TINY, "data.path=/nowhere/corpus.txt", "resume=/nowhere/step-00000001",
                               "train.seq_len=512", "--world-size", "2")
    assert code == 2
    assert len(findings) == 4 and findings[-1].startswith("harness: check: 3 problem(s)")


def test_the_summary_says_how_much_of_the_data_the_run_reads(capsys):
    code, _, out = _check(capsys, str(ROOT / "configs" / "smollm2-135m-sft.yaml"), "data.pack=false", "train.steps=100",
                          "--world-size", "2")
    assert code == 0
    # 2,000 conversations, 5% held out; 100 steps x 2 ranks x 2 micro-batches x 2 rows
    assert "data 1,900 examples, 0.4 epoch(s)" in out


@pytest.mark.spawns
def test_a_hub_dataset_that_does_not_resolve_is_one_line():
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "harness"), "check", TINY, "data.path=nosuchorg/nosuchdata",
                             "--world-size", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("harness: check: data.path 'nosuchorg/nosuchdata' is no local file "
                                                   "and the hub (or its cache) has no such dataset")
