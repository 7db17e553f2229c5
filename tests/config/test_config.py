"""Config loading: every shipped config validates; bad input is one clean line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import Config, ModelConfig, field_docs, help_text, load_config, validate_for_world
from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "demo.yaml", "smollm2-135m.yaml"} <= names


def test_the_readme_lists_every_shipped_config():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in CONFIGS if f"`{p.name}`" not in readme] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.name == path.stem
    assert cfg.run.dir == f"runs/{path.stem}"
    validate_for_world(cfg, 2)
    # The file only uses keys the schema knows, so a drifting config fails here too.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(cfg.to_dict())


def test_overrides_beat_the_file_and_parse_as_yaml():
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["train.steps=3", "faults.nonfinite_grad_steps=[2,3]", "train.lr=3e-4", "log.progress=off", "precision=fp16"],
    )
    assert cfg.train.steps == 3
    assert cfg.faults.nonfinite_grad_steps == [2, 3]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.log.progress == "off"
    assert cfg.precision == "fp16"


def test_nonfinite_value_per_step_list():
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["faults.nonfinite_grad_steps=[2,3,5]", "faults.nonfinite_value=[inf,inf,nan]"],
    )
    assert cfg.faults.nonfinite_value == ["inf", "inf", "nan"]


def test_every_field_has_a_docstring_and_help_lists_it():
    import dataclasses
    import typing

    seen = []

    def walk(cls, prefix=""):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{prefix}{f.name} has no docstring"
            seen.append(prefix + f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Config)
    assert "scaler.consecutive_hysteresis" in seen
    text = help_text()
    for key in ("train.grad_accum", "scaler.hysteresis", "faults.nonfinite_grad_rank", "log.per_rank"):
        assert key in text


BAD = [
    (["train.stepz=3"], "unknown config key train.stepz: did you mean train.steps?"),
    (["train.steps=abc"], "train.steps must be an integer (got str 'abc')"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["precision=fp4"], "precision must be one of fp32, bf16, fp16, fp8 (got str 'fp4')"),
    (["parallel.backend=megatron"], "parallel.backend must be one of"),
    (["train.lr=-1"], "train.lr must be >= 0"),
    (["train.min_lr=1.0"], "train.min_lr must be between 0 and train.lr"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    (["scaler.backoff_factor=2"], "scaler.backoff_factor must be in (0, 1)"),
    (["scaler.hysteresis=0"], "scaler.hysteresis must be >= 1"),
    (["scaler.min_scale=1e9"], "scaler.min_scale must be in (0, scaler.init_scale"),
    (["scaler.consecutive_hysteresis=maybe"], "scaler.consecutive_hysteresis must be true or false"),
    (["faults.nonfinite_grad_steps=3"], "faults.nonfinite_grad_steps must be a list"),
    (["faults.nonfinite_grad_steps=[99]"], "faults.nonfinite_grad_steps has step 99, outside 1..train.steps=8"),
    (["faults.nonfinite_value=zero"], "faults.nonfinite_value must be one of inf, -inf, nan"),
    (["faults.nonfinite_grad_steps=[1,2]", "faults.nonfinite_value=[nan]"], "has 1 values for 2"),
    (["model.config={}"], "model.config.model_type is required"),
    (["eval.every=2", "data.val_fraction=0"], "needs held-out data"),
    (["log.progress=fancy"], "log.progress must be one of auto, bar, lines, off"),
    (["train=3"], "train must be a mapping"),
    (["train.steps"], "is not of the form key.sub=value"),
    (["train.steps.deep=1"], "goes inside train.steps, which is not a section"),
    (["model.vocab_multiple_of=0"], "model.vocab_multiple_of must be >= 1"),
    (["model.selective_ac=0"], "model.selective_ac must be op or a positive integer k"),
    (["model.activation_checkpointing=some"], "model.activation_checkpointing must be one of none, full, selective"),
    (["model.gradient_checkpointing=true", "model.activation_checkpointing=selective"], "keep one"),
    (["train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens must be >= 0"),
    (["parallel.prefetch=-1"], "parallel.prefetch must be >= 0"),
    (["parallel.backend=deepspeed", "parallel.reduce_every_micro_batch=true"],
     "parallel.reduce_every_micro_batch is an FSDP2 switch"),
    (["model.pretrained=bundled:smollm2-135m", "model.config={num_hidden_layers: 4}"],
     "model.config.num_hidden_layers would change what model.pretrained 'bundled:smollm2-135m' is"),
    (["model.pretrained=bundled:smollm2-135m"], "model.config.model_type, model.config.n_layer, model.config.n_embd, "
                                                "model.config.n_head ... would change"),
    (["data.format=chat", "data.sources=[{path: a.txt}]"], "data.format=chat reads one dataset"),
    (["data.chat_template=t.jinja"], "data.chat_template applies to data.format=chat"),
    (["data.train_on=prompts"], "data.train_on must be one of assistant, all"),
    (["data.overlong=wrap"], "data.overlong must be one of truncate, drop"),
    (["eval.prompts=[[{role: narrator, content: hi}]]"], "eval.prompts[0] must be a string or a list of"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens must be >= 1"),
]


def test_a_pretrained_model_brings_its_tokenizer_and_may_tune_how_it_runs():
    assert "tokenizer" not in yaml.safe_load((ROOT / "configs/smollm2-135m-sft.yaml").read_text())["data"]
    assert load_config(ROOT / "configs/smollm2-135m-sft.yaml").data.tokenizer == "bundled:smollm2-135m"
    assert load_config(ROOT / "configs/tiny.yaml").data.tokenizer == "bundled:gpt2"
    explicit = load_config(ROOT / "configs/tiny.yaml", ["model.pretrained=/m", "model.config={}", "data.tokenizer=/t"])
    assert explicit.data.tokenizer == "/t"
    tuned = load_config(ROOT / "configs/tiny.yaml", [
        "model.pretrained=/m", "model.config={attn_implementation: eager, rope_scaling: {rope_type: linear, factor: 2.0}, "
        "max_position_embeddings: 4096, attention_dropout: 0.1, use_cache: false}"])
    assert tuned.model.config["rope_scaling"]["factor"] == 2.0
    # A Config built in Python (no load_config) resolves the same way.
    assert Config(model=ModelConfig(pretrained="/m")).tokenizer_ref() == "/m"
    assert Config().tokenizer_ref() == "bundled:gpt2"


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(scalar)


def test_world_size_checks():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["faults.nonfinite_grad_rank=1"])
    validate_for_world(cfg, 2)
    with pytest.raises(ConfigError, match="nonfinite_grad_rank=1 but the job has 1 rank"):
        validate_for_world(cfg, 1)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "harness", "train", "configs/tiny.yaml", "train.stepz=1"],
        [str(Path(sys.executable).parent / "harness"), "train", "configs/tiny.yaml", "train.stepz=1"],
        ["launch/local.sh", "2", "configs/tiny.yaml", "train.stepz=1"],
    ],
    ids=["python-m", "console-script", "launch-local"],
)
def test_cli_config_error_is_one_line_exit_2(command):
    result = _run(command)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["harness: error: unknown config key train.stepz: did you mean train.steps? "
                     "valid keys here: " + ", ".join(Config().train.__dataclass_fields__)], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_check_is_harness_check_and_help():
    """train --check is harness check (one preflight, one depth): it finds what the config alone
    does not show (a missing data path, a seq_len past the model's positions, a missing resume
    folder), with harness check's very lines; the launch scripts' --config-only says nothing."""
    ok = _run([sys.executable, "-m", "harness", "train", "configs/demo.yaml", "--check", "--world-size", "2"])
    assert ok.returncode == 0 and ok.stdout.startswith("check ok: configs/demo.yaml on 2 rank(s): ")
    mistakes = ["data.path=/nowhere/corpus.txt", "train.seq_len=4096", "resume=/nowhere/step-00000009"]
    via_train = _run([sys.executable, "-m", "harness", "train", "configs/tiny.yaml", *mistakes, "--check"])
    via_check = _run([sys.executable, "-m", "harness", "check", "configs/tiny.yaml", *mistakes])
    assert via_train.returncode == via_check.returncode == 2
    assert via_train.stderr == via_check.stderr and via_train.stderr.count("\n") == 4, via_train.stderr
    quiet = _run([sys.executable, "-m", "harness", "train", "configs/demo.yaml", "--config-only", "--world-size", "2"])
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""
    helped = _run([sys.executable, "-m", "harness", "train", "--help"])
    assert helped.returncode == 0 and "scaler.growth_interval" in helped.stdout
    ranks = _run([sys.executable, "-m", "harness", "train", "configs/tiny.yaml", "faults.nonfinite_grad_rank=3",
                  "--check", "--world-size", "2"])
    assert ranks.returncode == 2 and "use 0..1" in ranks.stderr
