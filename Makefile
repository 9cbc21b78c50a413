# `make quickstart` and `make test` create .venv on first use (Python 3.10+ with pip and venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart tour test test-heavy bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the exact versions the suite runs on (constraints.txt); pyproject.toml declares the supported ranges
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,wandb,openmmlab,export]'
	# optional natten backend, so that its tests run too (pure Python without a GPU; needs torch at build time)
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps natten==0.21.7
	touch $(STAMP)

# trains a small NAT on the built-in shapes data, then evaluates the result (a few minutes on 2 CPU cores)
quickstart: $(STAMP)
	$(BIN)/zoo train recipes/classification/quickstart.yaml --output runs/quickstart --overwrite
	$(BIN)/zoo eval --checkpoint runs/quickstart/model --data shapes

tour: $(STAMP)
	$(BIN)/python tools/tour.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy

bench: $(STAMP)
	$(BIN)/zoo bench --model nat_mini dinat_mini --baseline convnext_tiny
