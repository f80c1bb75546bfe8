# The two commands a newcomer needs: `make demo` and `make test` (each installs first).
PYTHON      ?= python3
VENV        ?= .venv
# CPU torch pinned for development/CI machines; GPU users: see README "Installing on a GPU machine".
CONSTRAINTS ?= constraints-cpu.txt
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	# fastmri is a test oracle only; --no-deps keeps its old torch pin out.
	$(BIN)/python -m pip install --quiet --no-deps fastmri==0.3.0
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/varnet demo --out demo_out

bench: install
	$(BIN)/varnet bench model

clean:
	rm -rf $(VENV) demo_out *.egg-info .pytest_cache
