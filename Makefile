# Two commands on a fresh machine:  make run  (whole tiny pipeline)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev
comma  := ,
# metrics (spo[metrics]) is installed by scripts/install_metrics.sh, which picks the torchvision build for torch.
PIP_EXTRAS := $(subst $() ,$(comma),$(strip $(filter-out metrics,$(subst $(comma), ,$(EXTRAS)))))
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# dev: the real CLIP vocabulary for the real-size builders' tests (tests/unit/test_realsize.py). Without
# torchvision open_clip does not import, and is not meant to: only its bpe_simple_vocab_16e6.txt.gz is read.
BPE_VOCAB_WHEEL := open-clip-torch==3.3.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test lint bench clean params dvc-yaml plots

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh scripts/install_metrics.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	bash scripts/install_torch.sh $(BIN)/pip
	$(BIN)/python -m pip install --quiet -e ".$(if $(PIP_EXTRAS),[$(PIP_EXTRAS)])"
	$(if $(filter dev,$(subst $(comma), ,$(EXTRAS))),$(BIN)/python -m pip install --quiet --no-deps $(BPE_VOCAB_WHEEL))
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

# dvc plots show with vega inlined (DVC's page loads it from a CDN: blank offline). npm fetches it once.
plots: install
	test -f .dvc/tmp/plots-offline.html || bash scripts/dvc_plots_offline.sh .dvc/tmp/plots-offline.html
	PATH=$(BIN):$$PATH dvc plots show --html-template .dvc/tmp/plots-offline.html

# dvc.yaml is generated from the stage graph in spo/pipeline_spec.py (a unit test fails when they drift).
dvc-yaml: install
	$(BIN)/spo dvc-yaml > dvc.yaml.new && mv dvc.yaml.new dvc.yaml

# The Python packages the lent GPU machine lacks (/work/.library/device/KINDS.md: Python 3.12, torch,
# transformers, accelerate, peft, safetensors, ... but no diffusers, pydantic, ruamel.yaml), as wheels for
# bench/gpu/check.sh, which installs only those still missing there. The pins are this venv's versions;
# open-clip-torch only carries the CLIP BPE vocabulary file (never installed). ~10 MB: the device tool
# carries at most 64 MiB per call (bench/RESULTS.md, "GPU check").
GPU_WHEELS_DIR := bench/gpu/wheels
GPU_WHEELS := diffusers==0.42.1 importlib-metadata==9.1.0 zipp==4.1.2 pydantic==2.14.4 pydantic-core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 ruamel.yaml==0.19.1 \
	$(BPE_VOCAB_WHEEL)
.PHONY: gpu-wheels
gpu-wheels:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
		-d $(GPU_WHEELS_DIR) $(GPU_WHEELS)
	du -sh $(GPU_WHEELS_DIR)
