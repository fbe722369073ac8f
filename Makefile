# make demo | make test | make bench — each installs into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
PYTEST_ARGS ?=

.PHONY: install demo table3-demo demo-synthetic test test-all bench install-tpu test-xla clean

install: $(VENV)/.installed

# The registry's torch is the CUDA 13 build (~2.7 GB of wheels with its nvidia-* libraries, 5.2 GB installed, GPU
# or not). TORCH_CPU=1: the same torch / torchaudio / torchvision versions as CPU wheels (~0.2 GB), from PyTorch's index.
TORCH_CPU ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PINS := $(shell sed -nE 's/^ *"(torch|torchaudio|torchvision)==([^"]+)",.*/\1==\2/p' pyproject.toml)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_CPU),$(PY) -m pip install --index-url $(TORCH_CPU_INDEX) $(TORCH_PINS))
	$(PY) -m pip install -e ".[dev]"
	touch $@

# The demo: real encoded videos (H.264/AAC, VP9/Opus, MPEG-4/MP3, audio-only wav, broken files) -> data_prep
# -> WebDataset shards -> train the tiny Zorro-ViT -> evaluate.py prints the A / V / A+V table.
demo: install
	$(PY) -m data_prep.make_demo --out $(DEMO_DIR)/videos --num-clips 96
	$(PY) -m data_prep --videos $(DEMO_DIR)/videos --labels $(DEMO_DIR)/videos/labels.csv --out $(DEMO_DIR)/shards \
		--workers 2 --short-side 72 --sample-rate 16000 --max-samples-per-shard 16
	rm -rf $(DEMO_DIR)/run $(DEMO_DIR)/eval
	$(PY) train.py experiment=demo data.root=$(DEMO_DIR)/shards hydra.run.dir=$(DEMO_DIR)/run test=false
	$(PY) evaluate.py ckpt_path=$(DEMO_DIR)/run/checkpoints/best.ckpt hydra.run.dir=$(DEMO_DIR)/eval
	@echo "demo done: shards and skipped.csv in $(DEMO_DIR)/shards, checkpoints in $(DEMO_DIR)/run/checkpoints,"
	@echo "W&B offline run in $(DEMO_DIR)/run/wandb (wandb sync $(DEMO_DIR)/run/wandb/offline-run-*), metrics in $(DEMO_DIR)/eval/metrics.json"

# The paper's central claim (Table 3) on real encoded clips: audio and video carry the same label, both cues on every
# clip (fully informative and redundant); the four-masking sweep over 3 seeds ends with the V / A / A+V table, mean ±
# std over the seeds, as report.md / .png / .html (README: what it shows and what it cannot).
# OMP_NUM_THREADS=1: the training process computes on one core and the two loader workers decode on the other
# (with two compute threads the four busy threads spin-wait against each other on a 2-core machine).
T3 := $(DEMO_DIR)/table3
T3_CLIPS ?= 400
T3_SEEDS ?= 0,1,2
T3_MASKINGS ?= zorro,two_streams,input_level,bottleneck
T3_ARGS ?=
table3-demo: install
	$(PY) -m data_prep.make_demo --out $(T3)/videos --labels shared --num-clips $(T3_CLIPS) --width 80 --height 64 \
		--seconds 1.6 --fps 12 --num-no-audio 0 --num-audio-only 0
	$(PY) -m data_prep --videos $(T3)/videos --labels $(T3)/videos/labels.csv --out $(T3)/shards \
		--workers 2 --short-side 64 --sample-rate 16000 --max-samples-per-shard 32 --quiet
	rm -rf $(T3)/sweep
	OMP_NUM_THREADS=1 $(PY) train.py -m experiment=table3_demo masking=$(T3_MASKINGS) seed=$(T3_SEEDS) \
		data.root=$(T3)/shards hydra.sweep.dir=$(T3)/sweep $(T3_ARGS)
	$(PY) -m zorro.eval.sweep_report $(T3)/sweep --reading avg > /dev/null
	@echo "table3-demo done: $(T3)/sweep/report.md, report.png and report.html (report_avg.*: the all-heads average in every column)"

demo-synthetic: install
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

# The XLA path on XLA:CPU (tests/test_xla.py), in the TPU environment.
test-xla:
	PJRT_DEVICE=CPU .venv-tpu/bin/python -m pytest tests/test_xla.py $(PYTEST_ARGS)
