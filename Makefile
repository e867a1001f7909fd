# Two commands on a fresh machine:  make run  (whole tiny pipeline)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev
comma  := ,
# metrics (spo[metrics]) is installed by scripts/install_metrics.sh, which picks the torchvision build for torch.
PIP_EXTRAS := $(subst $() ,$(comma),$(strip $(filter-out metrics,$(subst $(comma), ,$(EXTRAS)))))
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test lint bench clean params dvc-yaml

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh scripts/install_metrics.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	bash scripts/install_torch.sh $(BIN)/pip
	$(BIN)/python -m pip install --quiet -e ".$(if $(PIP_EXTRAS),[$(PIP_EXTRAS)])"
	$(if $(filter metrics,$(subst $(comma), ,$(EXTRAS))),bash scripts/install_metrics.sh $(BIN)/pip .)
	touch $(STAMP)

run: install
	$(BIN)/spo pipeline --preset tiny

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check spo flows tests bench

# Benchmarks (results and machines in bench/RESULTS.md); the full-size SD-1.5 one: bench/bench_spo.py --size sd15-256
bench: install
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_spm.py
	$(BIN)/python bench/bench_spo.py --size tiny
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf data/raw data/prepared data/eval_images models reports/eval reports/registry reports/pipeline_summary.json checkpoints mlflow .prefect dvc_plots

# params.yaml is the resolved tiny preset (the DVC params file); regenerate after editing spo/presets/tiny.yaml.
params: install
	{ head -n 2 params.yaml; $(BIN)/spo config --preset tiny --params /dev/null; } > params.yaml.new && mv params.yaml.new params.yaml

# dvc.yaml is generated from the stage graph in spo/pipeline_spec.py (a unit test fails when they drift).
dvc-yaml: install
	$(BIN)/spo dvc-yaml > dvc.yaml.new && mv dvc.yaml.new dvc.yaml
