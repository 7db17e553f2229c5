"""What happens when the input is wrong: every case is one line naming the problem and the fix, exit
code 2, no traceback, and nothing written over (no run dir created, an existing one untouched).

docs/reliability.md's "What happens when ..." section lists the same cases."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.reliability.drills import ROOT, TINY

pytestmark = pytest.mark.spawns

TRAIN = [sys.executable, "-m", "harness", "train"]
FAST = ["train.steps=1", "log.progress=off", "eval.every=0"]


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time (what "untouched" means)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGSTOP `process` and wait until every one of its threads has stopped.

    The signal is asynchronous: a thread inside a write() finishes that write before it stops, so a
    snapshot taken right after kill() can race a checkpoint still being written."""
    process.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{process.pid}/task")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):  # a thread may exit while we look
            states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks.iterdir()]
            if all(state in "tT" for state in states):
                return
        time.sleep(0.05)
    raise AssertionError(f"pid {process.pid} did not stop within {timeout} s")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Things the cases point at: a real checkpoint of the tiny model, a pretrained folder with one
    shard missing, config files that are broken in various ways."""
    base = tmp_path_factory.mktemp("assets")
    run = subprocess.run([*TRAIN, TINY, f"run.dir={base / 'ckpt-run'}", *FAST, "checkpoint.every=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    checkpoint = base / "ckpt-run" / "checkpoints" / "step-00000001"
    future = base / "future" / "step-00000001"
    shutil.copytree(checkpoint, future)
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format"] = "harness-checkpoint/99"
    (future / "manifest.json").write_text(json.dumps(manifest))

    shards = base / "sharded-model"
    script = textwrap.dedent(f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.for_model("llama", vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
        AutoModelForCausalLM.from_config(cfg).save_pretrained({str(shards)!r}, max_shard_size="2MB")
    """)
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (shards / missing).unlink()
    return {
        "checkpoint": checkpoint,
        "future": future,
        "shards": shards,
        "not_json": _write(base / "ds-broken.json", '{"zero_optimization": {"stage": 3,}'),
        "ds_batch": _write(base / "ds-batch.json", '{"train_batch_size": 7, "zero_optimization": {"stage": 3}}'),
        "not_yaml": _write(base / "broken.yaml", "train: [steps: 3\n"),
        "list_yaml": _write(base / "list.yaml", "- train\n- model\n"),
        "accelerate_8": _write(base / "accelerate-8.yaml", """\
            compute_environment: LOCAL_MACHINE
            distributed_type: FSDP
            mixed_precision: 'no'
            num_machines: 1
            num_processes: 8
            """),
        "accelerate_tpu": _write(base / "accelerate-tpu.yaml", "distributed_type: TPU\nnum_processes: 1\n"),
        # Issue 38: a message without content was ~120 lines of Jinja traceback from both ranks.
        "chat_no_content": _write(base / "chat-no-content.jsonl", """\
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]}
            """),
    }


# (case id, overrides or a function of the assets returning them, what the one line must say, ranks)
CASES: list[tuple[str, object, str, int]] = [
    ("ill-typed value", ["train.steps=many"], "train.steps must be an integer", 1),
    ("unknown key", ["train.stesp=3"], "did you mean train.steps", 1),
    ("unknown section", ["trainer.steps=3"], "unknown config key trainer", 1),
    ("zero stage 4", ["parallel.backend=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage must be one of 1, 2, 3", 1),
    ("negative learning rate", ["train.lr=-0.1"], "train.lr must be >= 0", 1),
    ("zero micro-batch", ["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1", 1),
    ("batch larger than the data", ["train.micro_batch_size=200000"], "fewer than one global batch", 1),
    ("world size not dividing the DeepSpeed batch", lambda a: ["parallel.backend=deepspeed", f"parallel.deepspeed_config={a['ds_batch']}"],
     "train_batch_size", 2),
    ("replicas not dividing the world", ["parallel.replicate=3"], "does not divide the world size 2", 2),
    ("nccl on a machine without a GPU", ["parallel.dist_backend=nccl"], "needs CUDA", 1),
    ("DeepSpeed JSON that is not JSON", lambda a: ["parallel.backend=deepspeed", f"parallel.deepspeed_config={a['not_json']}"],
     "is not valid JSON", 1),
    ("DeepSpeed JSON missing", ["parallel.backend=deepspeed", "parallel.deepspeed_config=/no/such.json"], "not found", 1),
    ("accelerate config for another machine", lambda a: [f"parallel.accelerate_config={a['accelerate_8']}"],
     "num_processes=8", 2),
    ("accelerate config for a TPU", lambda a: [f"parallel.accelerate_config={a['accelerate_tpu']}"], "TPU", 1),
    ("model folder with a missing shard", lambda a: [f"model.pretrained={a['shards']}", "model.config={}"], "shard", 1),
    ("model folder that does not exist", ["model.pretrained=/no/such/model"], "model.pretrained", 1),
    ("unknown model type", ["model.config.model_type=gpt5"], "not a transformers model", 1),
    ("tokenizer larger than the model's vocabulary", ["model.config.vocab_size=1000"], "embedding has 1000 rows", 1),
    ("sequence beyond the model's positions", ["train.seq_len=4096"], "train.seq_len=4096", 1),
    ("attention kernel that is not installed", ["model.attn_implementation=flash_attention_2"], "model.attn_implementation", 1),
    ("data path that does not exist", ["data.path=/no/such/corpus"], "data.path", 1),
    ("tokenizer that does not exist", ["data.tokenizer=/no/such/tokenizer"], "data.tokenizer", 1),
    ("checkpoint of another model", lambda a: [f"resume={a['checkpoint']}", "model.config.n_embd=64"], "model config differs", 1),
    ("checkpoint from a future harness", lambda a: [f"resume={a['future']}"], "newer harness", 1),
    ("unknown resume path", ["resume=/no/such/checkpoint"], "no such checkpoint folder", 1),
    ("spike factor below one", ["train.spike.factor=0.5"], "train.spike.factor must be > 1", 1),
    ("fault rank outside the world", ["faults.hang_at_step=2", "faults.hang_rank=5"], "faults.hang_rank=5", 2),
    ("wandb without a login", ["log.wandb=true", "log.wandb_mode=online"], "wandb login", 1),
    ("chat row without content", lambda a: [f"data.path={a['chat_no_content']}", "data.format=chat",
                                            "data.tokenizer=bundled:smollm2-135m", "data.cache_dir=" + str(a['chat_no_content'].parent / "cache")],
     "chat-no-content.jsonl, line 2: message 1 (user) has no 'content'", 2),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, assets, tmp_path):
    _, overrides, message, ranks = case
    overrides = overrides(assets) if callable(overrides) else overrides
    run_dir = tmp_path / "run"
    env = _no_wandb_login(tmp_path)
    launch = [str(ROOT / "launch/local.sh"), str(ranks), TINY] if ranks > 1 else [*TRAIN, TINY]
    result = subprocess.run([*launch, f"run.dir={run_dir}", *FAST, *overrides], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    _assert_one_line_error(result, message)
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_bad_config_files(assets, tmp_path):
    for config, message in [(assets["not_yaml"], "not valid YAML"), (assets["list_yaml"], "must be a mapping"),
                            (tmp_path / "missing.yaml", "not found")]:
        result = subprocess.run([*TRAIN, str(config), f"run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        _assert_one_line_error(result, message)
        assert not (tmp_path / "run").exists()


def test_a_run_dir_held_by_a_live_job_is_refused_and_untouched(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([*TRAIN, TINY, f"run.dir={run_dir}", "train.steps=100000", "log.progress=off",
                              "eval.every=0", "checkpoint.every=2"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        _stop(first)  # hold it still while the second one looks
        before = _snapshot(run_dir)
        second = subprocess.run([*TRAIN, TINY, f"run.dir={run_dir}", *FAST, "resume=auto"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        _assert_one_line_error(second, f"pid {first.pid}")
        assert "in use by another job" in second.stderr
        assert _snapshot(run_dir) == before
    finally:
        first.kill()
        first.wait()
    # Once the holder is gone (killed: the kernel dropped its lock) the run dir is free again.
    third = subprocess.run([*TRAIN, TINY, f"run.dir={run_dir}", *FAST, "resume=auto", "train.steps=100"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]


def test_a_read_only_run_dir_is_refused_and_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me\n")
    with _read_only(run_dir):
        before = _snapshot(run_dir)
        result = subprocess.run([*TRAIN, TINY, f"run.dir={run_dir}", *FAST], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        _assert_one_line_error(result, "not writable")
        assert _snapshot(run_dir) == before


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make `folder` read-only for the job: by its mode for an ordinary user; for root, whom
    modes do not stop, by a read-only bind mount of it onto itself."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _no_wandb_login(tmp_path: Path) -> dict:
    """An environment in which wandb finds no API key (and cannot reach its server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb-config")
    return env


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert message in errors[0], errors[0]
