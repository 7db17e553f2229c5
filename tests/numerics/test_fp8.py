"""precision=fp8: which layers convert (one rule, printed), torchao's Float8Linear on FSDP2 and
ZeRO-1/2/3 with emulated FP8 on 2 gloo ranks, the one decision under faults, checkpoints that move
between bf16 and fp8, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import FP8Config, load_config
from harness.errors import HarnessError
from harness.numerics.fp8 import SIZE_RULES, check_fp8_device, convert_to_fp8, plan_fp8
from tests.distributed import run_on_ranks
from tests.parallel.test_parallel_deepspeed import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
FP8 = str(ROOT / "configs" / "tiny-llama-fp8.yaml")
STEPS = 6


def _tiny_llama(**changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, max_position_embeddings=64)
    shape.update(changes)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape))


def test_the_middle_blocks_linear_layers_convert_and_the_rule_says_why_the_others_do_not():
    plan = plan_fp8(_tiny_llama(), FP8Config(emulate=True))
    assert plan.converted == [f"model.layers.{i}.{name}" for i in (1, 2) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    assert plan.describe("tensorwise") == ("fp8 (tensorwise): 14 of 28 linear layers run their matmuls in FP8; kept in "
                                           "bf16: 14 in the first or last block; embedding and output head stay bf16")
    skipped = plan_fp8(_tiny_llama(), FP8Config(emulate=True, skip=[r"mlp\.down_proj"]))
    assert len(skipped.converted) == 12 and skipped.kept["matching fp8.skip"] == [
        "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    odd = plan_fp8(_tiny_llama(intermediate_size=120), FP8Config(emulate=True))
    assert len(odd.kept["with a dimension not a multiple of 16"]) == 6  # gate, up, down of blocks 1 and 2
    small = plan_fp8(_tiny_llama(), FP8Config(emulate=True, min_features=64))  # k/v project to 2 heads x 16
    assert small.kept["smaller than fp8.min_features=64"] == [
        f"model.layers.{i}.self_attn.{n}" for i in (1, 2) for n in ("k_proj", "v_proj")]
    # Without emulation, torchao's size rule applies: a 64-wide model gains nothing from FP8.
    assert plan_fp8(_tiny_llama(), FP8Config()).converted == []


def test_a_model_with_nothing_to_convert_is_refused_in_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=4, n_embd=64, n_head=4))
    with pytest.raises(HarnessError, match=r"precision=fp8 converts no layer of GPT2LMHeadModel .*Conv1D"):
        convert_to_fp8(gpt2, FP8Config(emulate=True))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_the_size_rule_is_torchaos(recipe):
    """SIZE_RULES mirrors torchao's own auto-filter; if torchao changes its thresholds, this fails."""
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    theirs = _auto_filter_for_recipe(recipe, filter_fqns=[])
    for out_features in (512, 1024, 2048, 3072, 4096, 8192, 14336):
        for in_features in (512, 1024, 2048, 4096, 8192):
            with torch.device("meta"):
                linear = torch.nn.Linear(in_features, out_features)
            assert SIZE_RULES[recipe](out_features, in_features) == theirs(linear, "x"), (out_features, in_features)


def test_fp8_needs_fp8_tensor_cores_or_emulation(monkeypatch):
    with pytest.raises(HarnessError, match="precision=fp8 on cpu has no FP8 tensor cores; set fp8.emulate=true"):
        check_fp8_device(torch.device("cpu"), FP8Config())
    check_fp8_device(torch.device("cpu"), FP8Config(emulate=True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(HarnessError, match="compute capability 8.9 or newer.*A100-SXM4-80GB has 8.0: use precision=bf16"):
        check_fp8_device(torch.device("cuda", 0), FP8Config())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda", 0), FP8Config())


def test_a_deepspeed_json_with_fp16_contradicts_precision_fp8(tmp_path):
    from harness.errors import ConfigError

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="fp16.enabled=true contradicts precision=fp8"):
        load_config(FP8, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={ds}"])
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    assert load_config(FP8, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={ds}"]).precision == "fp8"


def _common(run_dir: str, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", "log.progress=off", "log.every=1", "eval.every=0", f"train.steps={STEPS}", *extra]


def _scenarios(root: str) -> dict:
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = hdist.device_for(info, "gloo")
    hdist.init_process_group(info, "gloo", 120, device)
    linears = {}

    def fit(name: str, *overrides: str):
        loop = build_loop(load_config(FP8, _common(f"{root}/{name}", *overrides)), info, device)
        linears[name] = sorted({type(m).__name__ for m in loop.backend.module.modules() if "Linear" in type(m).__name__})
        loop.fit()
        return loop

    for label, backend in BACKENDS.items():
        fit(f"fp8-{label}", *backend)
    for label in ("fsdp2", "zero3"):
        fit(f"bf16-{label}", "precision=bf16", *BACKENDS[label])
    fit("faults", "faults.nonfinite_grad_steps=[3]", "faults.nonfinite_grad_rank=1", "log.per_rank=true")
    fit("diagnosed", "train.steps=3", "debug.nan_hooks=true", "faults.nonfinite_grad_steps=[2]",
        "faults.nonfinite_forward_module=model.layers.1.mlp.up_proj")
    fit("gather-bf16", "train.steps=10", "debug.count_syncs=true")
    loop = fit("gather-fp8", "train.steps=10", "debug.count_syncs=true", "fp8.all_gather=true")
    linears["scales"] = _ours_and_torchaos_scales(loop.backend.module)
    return linears


def _ours_and_torchaos_scales(model) -> tuple[list[float], list[float]]:
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
    from torchao.float8.float8_linear import Float8Linear

    from harness.numerics.fp8 import scale_precompute

    weights = [m.weight._local_tensor for m in model.modules() if isinstance(m, Float8Linear)]
    precompute_float8_dynamic_scale_for_fsdp(model)
    theirs = [float(w._precomputed_scale) for w in weights]
    for w in weights:
        w._precomputed_scale = None
    scale_precompute(model)()
    return [float(w._precomputed_scale) for w in weights], theirs


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    linears = run_on_ranks(_scenarios, 2, str(root))
    return root, linears


@pytest.mark.spawns
def test_fp8_runs_torchaos_float8_linear_on_every_backend(runs):
    _, linears = runs
    for rank in linears:
        for label in BACKENDS:
            assert linears_of(rank, f"fp8-{label}") == ["Float8Linear", "Linear"], label
        assert linears_of(rank, "bf16-fsdp2") == ["Linear"]


def linears_of(rank_result: dict, name: str) -> list[str]:
    return rank_result[name]


@pytest.mark.spawns
def test_fp8_is_close_to_bf16_and_agrees_across_backends_within_todays_bf16_tolerance(runs):
    root, _ = runs
    fsdp2 = _losses(root / "fp8-fsdp2" / "metrics.jsonl")
    bf16 = _losses(root / "bf16-fsdp2" / "metrics.jsonl")
    assert fsdp2 != bf16  # the FP8 casts change the numbers ...
    assert fsdp2 == pytest.approx(bf16, rel=1e-2)  # ... by little
    for label in ("zero1", "zero2", "zero3"):
        assert _losses(root / f"fp8-{label}" / "metrics.jsonl") == pytest.approx(fsdp2, rel=2e-3), label
    assert _losses(root / "bf16-zero3" / "metrics.jsonl") == pytest.approx(bf16, rel=2e-3)


@pytest.mark.spawns
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank_under_fp8(runs):
    root, _ = runs
    for rank in (0, 1):
        rows = [json.loads(line) for line in (root / "faults" / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [r["skipped"] for r in rows] == [False, False, True, False, False, False], rank


@pytest.mark.spawns
def test_kill_and_resume_is_exact_and_checkpoints_move_between_bf16_and_fp8(tmp_path):
    def launch(run_dir, *overrides):
        return subprocess.run(["launch/local.sh", "2", FP8, f"run.dir={run_dir}", "log.progress=off", "eval.every=0",
                               *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)

    whole = launch(tmp_path / "whole", "train.steps=6")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = launch(tmp_path / "killed", "train.steps=6", "checkpoint.every=3", "faults.kill_at_step=3")
    assert killed.returncode != 0
    resumed = launch(tmp_path / "killed", "train.steps=6", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "killed" / "metrics.jsonl")[-3:] == _losses(tmp_path / "whole" / "metrics.jsonl")[-3:]
    # A bf16 run's checkpoint continues as fp8 (fp32 masters either way, the same parameter names).
    moved = launch(tmp_path / "killed", "train.steps=8", "resume=auto", "precision=bf16")
    assert moved.returncode == 0 and "continuing after step 6" in moved.stdout + moved.stderr


@pytest.mark.spawns
def test_fp8_on_cpu_without_emulation_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness", "train", FP8, "fp8.emulate=false", f"run.dir={tmp_path / 'r'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "harness: error: precision=fp8 on cpu has no FP8 tensor cores; set fp8.emulate=true to run the FP8 path emulated "
        "(tests), or use precision=bf16"]
    assert not (tmp_path / "r").exists()


@pytest.mark.spawns
def test_fp8_all_gather_halves_the_converted_weights_bytes_as_the_estimate_says_and_keeps_the_losses(runs):
    from harness.estimate.communication import collective_plan
    from harness.estimate.memory import meta_model

    root, results = runs
    with_bf16 = _losses(root / "gather-bf16" / "metrics.jsonl")
    with_fp8 = _losses(root / "gather-fp8" / "metrics.jsonl")
    assert len(with_fp8) == 10 and with_fp8 == pytest.approx(with_bf16, rel=1e-3)
    for name, overrides in (("gather-bf16", []), ("gather-fp8", ["fp8.all_gather=true"])):
        cfg = load_config(FP8, _common(str(root / name), "train.steps=10", *overrides))
        counted = [json.loads(line)["collectives"] for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert counted[-1] == collective_plan(meta_model(cfg), cfg, 2).by_op(), name
    saved = counted[-1]["all_gather_into_tensor"]["bytes"]
    before = json.loads((root / "gather-bf16" / "metrics.jsonl").read_text().splitlines()[-1])["collectives"]
    converted = 2 * 36_864  # blocks 1 and 2: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128
    assert before["all_gather_into_tensor"]["bytes"] - saved == 2 * converted  # forward + backward, 1 byte not 2
    assert counted[-1]["all_reduce"]["count"] == before["all_reduce"]["count"] + 1  # the one amax all-reduce
    ours, theirs = results[0]["scales"]
    assert ours == theirs and len(ours) == 14  # the counted precompute sets torchao's own scales


@pytest.mark.spawns
def test_fp8_all_gather_works_when_a_weight_does_not_divide_by_the_ranks(tmp_path):
    """3 ranks: k_proj's 32 rows split 11, 11, 10 (pytorch/ao#3982 crashes here without the padding)."""
    from harness.estimate.communication import collective_plan
    from harness.estimate.memory import meta_model

    overrides = [f"run.dir={tmp_path}", "log.progress=off", "eval.every=0", "train.steps=4", "debug.count_syncs=true",
                 "fp8.all_gather=true"]
    result = subprocess.run(["launch/local.sh", "3", FP8, *overrides], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    cfg = load_config(FP8, overrides)
    assert rows[-1]["collectives"] == collective_plan(meta_model(cfg), cfg, 3).by_op()


def test_fp8_all_gather_is_tensorwise_and_fsdp2_only():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="fp8.all_gather needs fp8.recipe=tensorwise"):
        load_config(FP8, ["fp8.all_gather=true", "fp8.recipe=rowwise"])
    with pytest.raises(ConfigError, match="fp8.all_gather is FSDP2's"):
        load_config(FP8, ["fp8.all_gather=true", "parallel.backend=deepspeed", "parallel.zero_stage=3"])


@pytest.mark.spawns
def test_the_overflow_diagnosis_names_an_fp8_layer(runs):
    root, _ = runs
    rows = [json.loads(line) for line in (root / "diagnosed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[1]["nonfinite_module"] == "model.layers.1.mlp.up_proj"  # a Float8Linear
