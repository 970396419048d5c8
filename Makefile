# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.backdoor-lens-installed
# Open MPI refuses to start as root without these; more ranks than cores needs oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/install_torchvision_shim.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls a CUDA build and gigabytes of packages.
	# --no-compile, then compileall on every core: pip compiles the bytecode on one core as it
	# installs (on 2 cores, torch took 23 s that way and 16 s this way).
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt
	# pip leaves a file that does not compile (a test written for another Python) uncompiled; so do we.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	# the package itself, editable: `backdoor-lens` on the PATH of .venv, `import backdoor_lens` anywhere
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python tools/install_torchvision_shim.py
	# Graphviz's dot renders the network diagrams; optional, installed when we can.
	command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (timeout 300 apt-get install -y -q graphviz >/dev/null 2>&1 || \
	   (timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q graphviz >/dev/null 2>&1)) ; } || \
	  echo "note: Graphviz 'dot' not installed; visual_network.py will write .gv sources only"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo.build_demo
	test -f record/badnet_demo/defense/clp/defense_result.pt || $(BIN)/python -m demo.defense_clp record/badnet_demo
	PATH="$(CURDIR)/$(BIN):$$PATH" bash demo.sh

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash bench/run_all.sh

clean-demo:
	rm -rf record/badnet_demo record/blended_demo
