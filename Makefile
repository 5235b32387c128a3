# The README's two commands: `make demo` and `make test`. Both create .venv when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean cluster-deps

venv: $(STAMP)

# torch goes in first: DeepSpeed's setup imports it, so DeepSpeed is built without isolation.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip<26" setuptools wheel
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# The venv first on PATH (torchrun, and ninja should DeepSpeed ever JIT-build an op: a different ninja hashes
# the build differently). A CPU run builds none: pipeline.core.distributed keeps DeepSpeed from compiling its
# shared-memory comm op, which only tensor-parallel inference uses.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

demo: $(STAMP)
	$(RUN) $(BIN)/python -m pipeline.study.demo $(ARGS)

test: $(STAMP)
	$(RUN) $(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(RUN) $(BIN)/python -m pytest tests -m "not slow"

# SLURM and munge for the two-node test cluster (tests/cluster/); the tests install them too when root.
cluster-deps:
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge

clean:
	rm -rf $(VENV) .cache
