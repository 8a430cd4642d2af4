# Two commands from nothing: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
HARNESS := $(VENV)/bin/harness
FMNIST  := /usr/share/datasets/fashion-mnist
DEMO_DB ?= sqlite:///results.db

.PHONY: demo test wheel-check install install-dev fmnist-data clean-cache

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch/torchvision come from the ranges in pyproject.toml (2.14.1 / 0.29.1 on our machines).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The demo's data: Debian's dataset-fashion-mnist when we may install it, else
# torchvision's download (the harness says what to do when neither works).
fmnist-data:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	fi

# Every registered method on Fashion-MNIST-LT (rho 100, preset quick, seeds 0 1 2: a board of one
# seed cannot tell methods apart) in one sweep: one process,
# stage 1 trained once per recipe and reused (CE's by cRT, LWS, tau-norm, NCM, post-hoc LA).
demo: $(VENV)/.installed fmnist-data
	$(HARNESS) sweep --datasets fmnist-lt --preset quick --seeds 0 1 2 --download --db $(DEMO_DB)
	$(HARNESS) report --db $(DEMO_DB)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# A regular install (the wheel, not the checkout) runs from another directory (.ci/wheel-check).
wheel-check: $(VENV)/.installed fmnist-data
	PYTHON=$(PY) .ci/wheel-check

# The GPU proof (README, "Proving it on a GPU"). gpu-prep puts what the GPU machines lack into
# the git-ignored .whl/ and .devdata/; gpu-proof runs the proof on this machine's own GPU,
# STEP=correctness|speed|table for one step, PROOF_BUDGET seconds per call.
PROOF_OUT    ?= .devdata/proof
PROOF_BUDGET ?= 540

.PHONY: gpu-prep gpu-proof

gpu-prep: $(VENV)/.installed
	$(PY) bench/gpu_prep.py

gpu-proof: $(VENV)/.installed-dev
	@test -f .devdata/cifar10-jpeg.tar.gz || $(MAKE) gpu-prep
	$(PY) bench/gpu_proof.py --out $(PROOF_OUT) --budget-s $(PROOF_BUDGET) $(if $(STEP),--step $(STEP))

clean-cache:
	rm -rf .harness_cache
