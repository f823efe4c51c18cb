# moshivis_lab: every target creates .venv and installs with the tested pins when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= tiny
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
export NO_TORCH_COMPILE := 1

.PHONY: venv test lint reproduce pretrain-bases data lab bench bench-gpu clean-data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Kyutai's moshi package, only as a test reference (it pins torch<2.10, hence --no-deps)
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps moshi einops
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q --timeout=900 tests
	MOSHIVIS_PRESET=smoke $(BIN)/pytest -q --timeout=900 --nbmake notebooks

# The whole tiny pipeline end to end from the shipped bases (bases/tiny; README for its time;
# finished stages are skipped): data, adapters, evaluation, reduced ablations, figures/ + REPORT.md.
# REBUILD_BASES=1 trains the tokenizer, codec, encoder and speech LM here instead.
reproduce: venv
	$(BIN)/moshivis-lab reproduce --preset $(PRESET) $(if $(REBUILD_BASES),--rebuild-bases)

# Retrain the bases from nothing and ship them to bases/$(PRESET)/ with their recipe (README).
pretrain-bases: venv
	$(BIN)/moshivis-lab pretrain-bases --preset $(PRESET)

data: venv
	$(BIN)/moshivis-lab data --preset $(PRESET)

lab: venv
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: venv
	$(BIN)/python benchmarks/run.py --preset $(PRESET)

# The released shape on one CUDA GPU (<= 8 min): streaming step with/without vision, adapter
# training at batch 1 x 750 frames and the largest batch; JSON + markdown in benchmarks/results/.
bench-gpu: venv
	$(BIN)/python benchmarks/gpu.py

clean-data:
	rm -rf data/$(PRESET)
