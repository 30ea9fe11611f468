# One command to set up and run the default DAG (make demo), one to set up and run the tests (make test).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
CORES  ?= all
UV_PIN ?= uv==0.13.9

# every cache inside the repository (ignored folders): a run writes nothing to the home directory
export HF_HOME        := $(CURDIR)/.cache/huggingface
export TORCH_HOME     := $(CURDIR)/.cache/torch
export XDG_CACHE_HOME := $(CURDIR)/.cache/xdg
export MPLCONFIGDIR   := $(CURDIR)/.cache/matplotlib
export PIP_CACHE_DIR  := $(CURDIR)/.cache/pip
export UV_CACHE_DIR   := $(CURDIR)/.cache/uv
export UV_PYTHON_DOWNLOADS := never
export HF_HUB_OFFLINE := 1
export PATH           := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: env demo test test-slurm lint dry-run lock envs clean-results

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@# uv installs the same pins as pip would (requirements.lock as constraints), unpacking the wheels in parallel: torch's
	@# CUDA libraries are ~5.5 GB of the venv. Measured here from an empty cache: ~25-30 s against pip's ~90 s. Where uv
	@# cannot be installed or fails, pip does the install instead.
	$(PY) -m pip install --quiet "$(UV_PIN)" && $(VENV)/bin/uv pip install --quiet --python $(PY) \
		-c requirements.lock -e ".[test]" \
	|| { $(PY) -m pip install --quiet --upgrade "pip>=23" && \
	     $(PY) -m pip install --quiet --no-compile -c requirements.lock -e ".[test]"; }
	@# bytecode for every installed module, on all cores (pip compiles one file at a time: ~65 of its ~145 s on 2 cores).
	@# Some third-party files are not Python 3.11 (torch's py312 test helpers): pip skips them too, hence the || true.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > $(VENV)/compileall.log 2>&1 || true
	touch $@

env: $(VENV)/.installed

demo: env
	snakemake --cores $(CORES)

test: env
	$(PY) -m pytest -q -n 2 --dist loadfile

# not part of `make test`: the tiny DAG through profiles/slurm on a live cluster (start one: sudo tools/slurm-local.sh)
test-slurm: env
	CONTINUAL_BENCH_SLURM=1 $(PY) -m pytest -q -m slurm tests/test_slurm_live.py

dry-run: env
	snakemake -n --cores $(CORES)

lint: env
	snakemake --lint

lock: env
	@# uv is the installer (UV_PIN), not a dependency of the package
	$(PY) -m pip freeze --exclude-editable | grep -v -e '^continual' -e '^uv==' > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-results:
	rm -rf results/$(RUN)/runs

envs: env  # the rules' env follows the installed packages' dependency metadata
	$(PY) tools/sync_envs.py
