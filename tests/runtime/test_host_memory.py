"""Host memory of sharded initialisation and loading, as summary.json reports it.

The heavy drill is the issue's target: on 4 gloo ranks, a ~300M-parameter Llama (configs/
llama-300m.yaml, fp32 weights 1.2 GB) must cost each rank at most half the full fp32 model bytes
over the same ranks' setup peak for configs/tiny.yaml, built from random init and loaded from a
saved Hugging Face folder. The suite's form checks a small Llama against what harness predicts
for setup (`harness estimate`'s model), where the embeddings still dominate and the ratio is
not the point. On a CPU the "device" is host memory too, so what DeepSpeed allocates for ZeRO-3's
partitions at initialize counts here; on a GPU it does not.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from harness.config import ModelConfig, load_config
from harness.model import build_model, build_skeleton, model_spec
from harness.runtime.host_memory import process_resources

ROOT = Path(__file__).resolve().parents[2]
GPT2_VOCAB = 50257
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def setup_peak(run_dir: Path, config: str, *overrides: str) -> float:
    """The largest rank's setup host peak (GiB) of a one-step 4-rank run."""
    result = subprocess.run(
        ["launch/local.sh", "4", config, f"run.dir={run_dir}", "log.progress=off", "eval.every=0", "train.steps=1",
         "checkpoint.every=0", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peaks = json.loads((run_dir / "summary.json").read_text())["setup_host_peak_gb"]
    assert len(peaks) == 4
    return max(peaks)


def parameter_count(config: str) -> int:
    cfg = load_config(ROOT / config)
    return sum(p.numel() for p in build_skeleton(model_spec(cfg.model, GPT2_VOCAB)).parameters())  # meta: no memory


def saved_folder(config: str, folder: Path) -> Path:
    """The config's model, seeded, saved by transformers as an fp32 safetensors folder."""
    cfg = load_config(ROOT / config)
    model = build_model(ModelConfig(config=cfg.model.config), vocab_size=GPT2_VOCAB, seed=5)
    model.save_pretrained(folder)
    return folder


# Setup is what is measured; seq_len 8 keeps the one step that follows it short (a bf16 step of
# this model at seq_len 64 takes most of a minute on 4 ranks of a 2-core machine).
SMALL = ["train.seq_len=8", "model.config.hidden_size=512", "model.config.intermediate_size=2048", "model.config.num_hidden_layers=12",
         "model.config.num_attention_heads=8", "model.config.num_key_value_heads=2"]


def predicted_cpu_setup(backend: str, overrides: list[str]) -> tuple[float, float]:
    """(what this rank's setup should add over tiny's, the full fp32 model), GiB, from `harness
    estimate`'s model. On a CPU the state a GPU run keeps on the device is host memory too: FSDP2's
    fp32 shards; ZeRO-3's fp32 master partition, its bf16 partition and the fp32 gradient buffer
    DeepSpeed allocates at initialize."""
    from harness.estimate import estimate

    cfg = load_config(ROOT / "configs/llama-300m.yaml", [*BACKENDS[backend], *overrides])
    result = estimate(cfg, 4)
    numbers = result["backends"]["zero3" if backend == "zero3" else "fsdp2"]
    resident = numbers["master"]
    if backend == "zero3":
        resident += numbers["gradients"] + numbers["master"] // 2  # fp32 gradient buffer + bf16 partition
    return (resident + numbers["setup_host"]) / 2**30, 4 * result["parameters"] / 2**30


@pytest.mark.spawns
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_setup_host_peak_follows_the_sharded_plan(tmp_path, backend):
    """A 72M Llama on 4 ranks: each rank's setup adds its shards plus one init unit (here the
    embeddings), as `harness estimate` predicts, and much less than the whole fp32 model."""
    baseline = setup_peak(tmp_path / "tiny", "configs/tiny.yaml", *BACKENDS[backend])
    small = setup_peak(tmp_path / "small", "configs/llama-300m.yaml", *BACKENDS[backend], *SMALL)
    predicted, full_model = predicted_cpu_setup(backend, SMALL)
    added = small - baseline
    print(f"{backend}: setup adds {added:.3f} GiB, predicted {predicted:.3f} GiB, full fp32 model {full_model:.3f} GiB")
    assert added <= 1.15 * predicted + 0.03
    if backend == "fsdp2":  # ZeRO-3's own buffers alone are 10 bytes/param/rank here (0.625 x on 4 ranks)
        assert added < 0.8 * full_model


@pytest.fixture(scope="module")
def heavy_setup(tmp_path_factory):
    """Setup peaks of the 300M model and of tiny on 4 ranks, measured once per (backend, init)."""
    root = tmp_path_factory.mktemp("mem")
    model = "configs/llama-300m.yaml"
    measured: dict[tuple[str, str], tuple[float, float]] = {}
    folder: list[Path] = []

    def measure(backend: str, init: str) -> tuple[float, float]:
        """(the 300M model's setup peak minus tiny's, as a multiple of its fp32 bytes; in GiB)."""
        if (backend, init) not in measured:
            extra = []
            if init == "pretrained":
                if not folder:
                    folder.append(saved_folder(model, root / "hf"))
                extra = [f"model.pretrained={folder[0]}", "model.config={}"]
            baseline = setup_peak(root / f"tiny-{backend}", "configs/tiny.yaml", *BACKENDS[backend])
            big = setup_peak(root / f"{backend}-{init}", model, *BACKENDS[backend], *extra)
            fp32_gib = 4 * parameter_count(model) / 2**30
            added = big - baseline
            print(f"{backend} {init}: setup peak {big:.3f} GiB, tiny {baseline:.3f} GiB, difference {added:.3f} GiB "
                  f"= {added / fp32_gib:.2f} x the fp32 model ({fp32_gib:.2f} GiB)")
            measured[backend, init] = (added / fp32_gib, added)
        return measured[backend, init]

    return measure


@pytest.mark.heavy
@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_300m_fsdp2_setup_costs_at_most_half_the_fp32_model_per_rank(heavy_setup, init):
    ratio, _ = heavy_setup("fsdp2", init)
    assert ratio <= 0.5


@pytest.mark.heavy
@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_300m_zero3_setup_adds_one_init_unit_to_deepspeeds_own_buffers(heavy_setup, init):
    """What harness controls on ZeRO-3: over DeepSpeed's own allocations at initialize (bf16 and
    fp32 partitions and the fp32 gradient buffer, 10 bytes per parameter per rank), at most one
    init unit (the 0.19 GiB embedding here) and 0.1 x the model of slack."""
    ratio, _ = heavy_setup("zero3", init)
    assert ratio <= 10 / 4 / 4 + 0.17 + 0.1


@pytest.mark.heavy
@pytest.mark.xfail(strict=True, reason="DeepSpeed 0.19 ZeRO-3 allocates 10 bytes/param/rank at initialize "
                   "(0.625 x the fp32 model on 4 ranks); on a CPU that is host memory")
@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_300m_zero3_setup_costs_at_most_half_the_fp32_model_per_rank(heavy_setup, init):
    ratio, _ = heavy_setup("zero3", init)
    assert ratio <= 0.5


@pytest.mark.spawns
def test_joined_threads_are_not_counted_as_alive():
    """Thread.join() returns a moment before the kernel drops the thread; a resources sample taken
    right after the last save's join must not report it (the soak failed on exactly that)."""
    before = process_resources()["threads"]
    for _ in range(300):  # unsettled, about 1 read in 60 here still lists a joined thread
        workers = [threading.Thread(target=sum, args=(range(1000),)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert process_resources(threads_quiet_s=0.01)["threads"] == before


def test_a_live_thread_is_counted():
    release = threading.Event()
    before = process_resources()["threads"]
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert process_resources()["threads"] == before + 1
    finally:
        release.set()
        worker.join()
