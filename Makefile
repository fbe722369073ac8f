# make demo | make test | make bench — each installs into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench install-tpu test-xla clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: install
	$(PY) train.py experiment=demo_synthetic paths.log_dir=$(DEMO_DIR)/logs

test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/attention.py

# TPU: torch_xla 2.9 needs torch 2.9, so it gets its own environment (never the default one).
install-tpu:
	$(PYTHON) -m venv .venv-tpu
	.venv-tpu/bin/pip install -q --upgrade pip
	.venv-tpu/bin/pip install "torch==2.9.*" "torchaudio==2.9.*" "torchvision==0.24.*" "torch_xla[tpu]==2.9.*"
	.venv-tpu/bin/pip install -e . --no-deps
	.venv-tpu/bin/pip install "lightning>=2.4,<2.7" torchmetrics "hydra-core>=1.3.2,<1.4" omegaconf timm einops \
		webdataset decord av soundfile wandb tqdm matplotlib pytest pytest-timeout hydra-submitit-launcher

clean:
	rm -rf $(VENV) .venv-tpu logs $(DEMO_DIR) .pytest_cache
