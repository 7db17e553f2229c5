"""lora.r: peft's LoRA on a frozen pretrained base, on FSDP2 and ZeRO-3 over 2 gloo ranks, against
plain peft in one process; the one scaling decision under faults; memory that matches the method;
checkpoints that hold the adapters and name their base; the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import ModelConfig, load_config
from harness.model import build_model
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 6
BASE_SHAPE = dict(model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=50256,
                  eos_token_id=50256)


def write_base(folder: Path, seed: int, **config) -> Path:
    """A pretrained Hugging Face folder (a small Llama on GPT-2's vocabulary), written by transformers."""
    build_model(ModelConfig(config={**BASE_SHAPE, **config}), vocab_size=50257, seed=seed).save_pretrained(folder)
    return folder


def lora_overrides(base: Path, run_dir, *extra: str) -> list[str]:
    return [f"model.pretrained={base}", "model.config={}", "lora.r=4", "lora.alpha=8", f"run.dir={run_dir}",
            "log.progress=off", "log.every=1", "eval.every=0", f"train.steps={STEPS}", "train.lr=1e-2", *extra]


ZERO3 = ("parallel.backend=deepspeed", "parallel.zero_stage=3")


ROLLBACK = ("train.spike.action=rollback", "train.spike.window=2", "faults.loss_spike_steps=[4]", "checkpoint.every=2",
            "log.every=2")
"""A loss spike at step 4, rolled back to the run's own step-2 checkpoint of adapters."""

TIED_HEAD = ("lora.target_modules=[q_proj,lm_head]",)
"""Adapters on a head the base ties to its input embeddings (SmolLM2, Gemma, ...)."""


def _scenarios(root: str, base: str, tied_base: str) -> dict:
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = hdist.device_for(info, "gloo")
    hdist.init_process_group(info, "gloo", 120, device)
    seen = {}

    def fit(name: str, *overrides: str, lora: bool = True, on: str = base):
        cfg_overrides = lora_overrides(Path(on), f"{root}/{name}", *overrides)
        if not lora:
            cfg_overrides.remove("lora.r=4")
        loop = build_loop(load_config(TINY, cfg_overrides), info, device)
        loop.fit()
        seen[name] = _memory_facts(loop.backend)
        return loop

    fit("fsdp2")
    fit("zero3", *ZERO3)
    fit("fsdp2-checkpointed", "model.activation_checkpointing=full", "train.loss_chunk_tokens=16")
    fit("fsdp2-bf16", "precision=bf16")
    fit("zero3-bf16", "precision=bf16", *ZERO3)
    fit("full-bf16", "precision=bf16", lora=False)
    for label, backend in (("fsdp2", ()), ("zero3", ZERO3)):
        fit(f"tied-head-{label}", *TIED_HEAD, *backend, on=tied_base)
        fit(f"faults-{label}", "precision=fp16", "faults.nonfinite_grad_steps=[3]", "faults.nonfinite_grad_rank=1",
            "log.per_rank=true", *backend)
        fit(f"rollback-{label}", *ROLLBACK, *backend)
    return seen


def _memory_facts(backend) -> dict:
    """What this rank holds: the dtypes of its frozen and trainable storage, and the bytes of its
    gradients' and optimizer state's storage."""
    optimizer = backend.torch_optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    master_bytes = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    frozen = {str(piece.tensors["param"].dtype) for piece in backend.frozen_pieces()}
    return {"frozen_dtypes": sorted(frozen), "optimizer_bytes": state_bytes + master_bytes,
            "frozen": len(backend.frozen_pieces()), "trainable": len(backend.state_pieces(with_optimizer_state=False))}


def _one_rank(root: str, base: str) -> None:
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = hdist.device_for(info, "gloo")
    hdist.init_process_group(info, "gloo", 120, device)
    build_loop(load_config(TINY, lora_overrides(Path(base), f"{root}/one-rank", "train.grad_accum=2")), info, device).fit()


def _four_ranks(root: str, base: str) -> None:
    """HSDP (FSDP2, 2 replicas) and hpZ (ZeRO-3 with secondary copies), 1 sequence per rank: the
    2-rank runs' global batch."""
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = hdist.device_for(info, "gloo")
    hdist.init_process_group(info, "gloo", 120, device)
    for name, backend in (("hsdp", ()), ("hpz", ZERO3)):
        overrides = lora_overrides(Path(base), f"{root}/{name}", "train.micro_batch_size=1", "parallel.replicate=2",
                                   *backend)
        build_loop(load_config(TINY, overrides), info, device).fit()


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base") / "llama", seed=11)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("tied-base") / "llama", seed=11, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base, tied_base):
    root = tmp_path_factory.mktemp("lora")
    facts = run_on_ranks(_scenarios, 2, str(root), str(base), str(tied_base))
    run_on_ranks(_one_rank, 1, str(root), str(base))
    return root, facts


def plain_peft_losses(base: Path, run_dir: Path, *overrides: str) -> list[float]:
    """The same fine-tune in one process with nothing of harness's model code: transformers'
    from_pretrained, peft's get_peft_model, torch AdamW; the adapters start from the values harness
    starts from (peft's init, seeded per layer)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.model.lora import peft_config
    from harness.model.source import model_source
    from tests.reference import reference_fp32

    cfg = load_config(TINY, lora_overrides(base, run_dir, *overrides))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    source = model_source(cfg.model, 50257, cfg.train.seq_len, lora=cfg.lora)
    skeleton = source.skeleton()
    peft_model = get_peft_model(model, peft_config(cfg.lora, list(source.lora_targets)))
    weights = source.initial_weights(cfg.train.seed)
    named = dict(peft_model.named_parameters())
    for unit in weights.units():
        if ".lora_" not in unit[0]:
            continue
        with weights.open(unit) as reader, torch.no_grad():
            for name in unit:
                target = named[f"base_model.model.{name}"]
                target.copy_(reader.read(name, 0, target.numel()).view_as(target))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == sum(
        p.numel() for p in skeleton.parameters() if p.requires_grad)
    return reference_fp32(TINY, lora_overrides(base, run_dir, *overrides), model=peft_model)[0]


@pytest.mark.spawns
def test_fp32_lora_is_plain_peft_on_fsdp2_on_zero3_on_one_rank_with_accumulation_and_checkpointed(runs, base, tmp_path):
    root, _ = runs
    want = plain_peft_losses(base, tmp_path / "ref")
    assert len(want) == STEPS and want[-1] < want[0]
    for name in ("fsdp2", "zero3", "one-rank", "fsdp2-checkpointed"):
        assert losses(root / name) == pytest.approx(want, rel=1e-5), name


@pytest.mark.spawns
def test_adapters_on_a_tied_head_are_plain_peft_on_fsdp2_and_zero3(runs, tied_base, tmp_path):
    root, _ = runs
    want = plain_peft_losses(tied_base, tmp_path / "ref", *TIED_HEAD)
    assert len(want) == STEPS and want[-1] < want[0]
    for name in ("tied-head-fsdp2", "tied-head-zero3"):
        assert losses(root / name) == pytest.approx(want, rel=1e-5), name


@pytest.mark.spawns
def test_lora_on_hsdp_and_hpz_replicas_gives_the_same_losses(runs, base):
    root, _ = runs
    run_on_ranks(_four_ranks, 4, str(root), str(base))
    for name in ("hsdp", "hpz"):  # hpZ's copies of the frozen base are rebuilt from the written partitions
        assert losses(root / name) == pytest.approx(losses(root / "fsdp2"), rel=1e-5), name


@pytest.mark.spawns
def test_the_base_is_frozen_in_the_compute_dtype_and_only_adapters_have_optimizer_state(runs):
    root, facts = runs
    for rank in facts:
        for name in ("fsdp2-bf16", "zero3-bf16"):
            assert rank[name]["frozen_dtypes"] == ["torch.bfloat16"], name
            assert rank[name]["trainable"] == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
        assert rank["fsdp2"]["frozen_dtypes"] == ["torch.float32"]
        assert rank["full-bf16"]["frozen"] == 0
        assert rank["fsdp2-bf16"]["optimizer_bytes"] <= 0.05 * rank["full-bf16"]["optimizer_bytes"]
    assert losses(root / "zero3-bf16") == pytest.approx(losses(root / "fsdp2-bf16"), rel=2e-3)


@pytest.mark.spawns
def test_a_non_finite_adapter_gradient_on_one_rank_skips_the_step_on_every_rank(runs):
    root, _ = runs
    for label in ("fsdp2", "zero3"):
        for rank in (0, 1):
            path = root / f"faults-{label}" / "ranks" / f"rank-{rank}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert [r["skipped"] for r in rows] == [False, False, True, False, False, False], (label, rank)


@pytest.mark.spawns
def test_a_loss_spike_rolls_lora_back_to_its_own_checkpoint_and_leaves_the_batch_out(runs):
    root, _ = runs
    for label in ("fsdp2", "zero3"):
        rows = [json.loads(line) for line in (root / f"rollback-{label}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4, 5, 6], label
        assert [r["spike"] for r in rows] == [False, False, False, True, False, False, False, False], label
        assert [r["skipped"] for r in rows] == [r["spike"] for r in rows], label
        assert [r["skipped_batches"] for r in rows] == [0] * 4 + [1] * 4, label
        # Step 3 re-runs from the step-2 adapters, optimizer state and RNG with the same batch.
        assert rows[4]["loss"] == pytest.approx(rows[2]["loss"], rel=1e-6), label
        assert rows[-1]["loss"] < rows[0]["loss"], label
        final = json.loads((root / f"rollback-{label}" / "checkpoints" / "step-00000006" / "manifest.json").read_text())
        assert final["trainer_state"]["rollbacks"] == 1 and final["trainer_state"]["skipped_batches"] == 1, label
        assert final["lora_base"] is not None, label
    assert losses(root / "rollback-zero3") == pytest.approx(losses(root / "rollback-fsdp2"), rel=1e-5)
    # Before the spike it is the plain run; after it, the spiking batch is left out, so it is not.
    assert losses(root / "rollback-fsdp2")[:3] == pytest.approx(losses(root / "fsdp2")[:3], rel=1e-6)


def launch(run_dir: Path, base: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(["launch/local.sh", "2", TINY, *lora_overrides(base, run_dir, *overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.spawns
@pytest.mark.parametrize("backend", [(), ZERO3], ids=["fsdp2", "zero3"])
def test_checkpoints_hold_the_adapters_resume_exactly_and_refuse_another_base(base, tmp_path, backend):
    whole = launch(tmp_path / "whole", base, *backend)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = launch(tmp_path / "killed", base, "checkpoint.every=3", "faults.kill_at_step=3", *backend)
    assert killed.returncode != 0
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000003"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["lora_base"]["pretrained"] == str(base) and len(manifest["lora_base"]["fingerprint"]) == 32
    from harness.checkpoint import ShardReader

    held = ShardReader(checkpoint, manifest).names()
    assert held and all(".lora_A." in n or ".lora_B." in n for n in held)  # the adapters, not the base
    resumed = launch(tmp_path / "killed", base, "resume=auto", *backend)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "killed")[-3:] == losses(tmp_path / "whole")[-3:]

    if backend:
        return
    # What follows reads the checkpoint before any backend does: once, on FSDP2.
    weights = launch(tmp_path / "new", base, f"resume={checkpoint}", "resume.weights_only=true")  # a new run from these adapters
    assert weights.returncode == 0 and "resume: weights from" in weights.stdout, weights.stderr[-2000:]
    assert losses(tmp_path / "new")[0] < losses(tmp_path / "whole")[0]  # step 1 starts from trained adapters

    other = write_base(tmp_path / "other-base", seed=12)
    refused = launch(tmp_path / "killed", other, f"resume={checkpoint}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"harness: error: step-00000003's adapters were trained on {str(base)!r} (weights ")
    assert "resume against the same base model, or start a new run (run.fresh=true moves the earlier one aside)" \
        in refused.stderr


@pytest.mark.parametrize("overrides, message", [
    (["lora.target_modules=[nonexistent_proj]"], "lora.target_modules=['nonexistent_proj'] match no module of LlamaForCausalLM"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=2"], "with ZeRO-2 would keep a whole base model on every rank"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=1"], "with ZeRO-1 would keep a whole base model on every rank"),
    (["lora.r=-1"], "lora.r must be >= 0"),
], ids=["no-match", "zero2", "zero1", "negative"])
def test_bad_lora_settings_are_one_line(base, tmp_path, overrides, message):
    result = subprocess.run([sys.executable, "-m", "harness", "train", TINY, *lora_overrides(base, tmp_path / "r", *overrides)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("harness: error: ") and message in lines[-1], lines[-3:]
    assert not (tmp_path / "r").exists()


@pytest.mark.spawns
def test_the_smollm2_lora_config_learns_and_its_adapter_export_generates_what_it_showed(tmp_path):
    """The shipped CPU config on the real SmolLM2-135M-Instruct (a tied head), shortened."""
    config = str(ROOT / "configs" / "smollm2-135m-lora.yaml")
    run_dir = tmp_path / "run"
    result = subprocess.run(["launch/local.sh", "2", config, f"run.dir={run_dir}", "precision=fp32", "train.steps=4",
                             "train.grad_accum=1", "train.seq_len=128", "eval.every=2", "eval.sequences=8",
                             "eval.max_new_tokens=12", "lora.dropout=0",
                             "log.progress=off", f"data.cache_dir={tmp_path / 'cache'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lora: r=16, alpha=32 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval_loss"] for row in rows if row.get("eval_loss") is not None]
    assert len(evals) == 2 and evals[1] < evals[0] < 5.0  # a pretrained model's loss (random: 10.8), going down
    shown = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]

    out = tmp_path / "adapter"
    exported = subprocess.run([sys.executable, "-m", "harness", "export", str(run_dir / "checkpoints" / "step-00000004"),
                               str(out), "--adapter"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness import assets

    # The adapter names its base as the run did, not by this machine's cache folder.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "bundled:smollm2-135m"
    base = AutoModelForCausalLM.from_pretrained(assets.resolve_model("bundled:smollm2-135m"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = load_config(config).eval.prompts[0]
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text == shown[-1]["completion"]
