# The two commands a newcomer needs: `make demo` and `make test` (each installs first); `make docs` builds
# the documentation site strictly (mkdocs.yml; a dead link fails).
PYTHON      ?= python3
VENV        ?= .venv
# CPU torch pinned for development/CI machines; GPU users: see docs/guide/install.md.
CONSTRAINTS ?= constraints-cpu.txt
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: install test docs demo bench openrecon gpu-wheels clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,docs]'
	# fastmri is a test oracle only; --no-deps keeps its old torch pin out.
	$(BIN)/python -m pip install --quiet --no-deps fastmri==0.3.0
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The site into site/; --strict turns every warning (dead link, missing anchor, page not in the nav) into a failure.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

demo: install
	$(BIN)/varnet demo --out demo_out

bench: install
	$(BIN)/varnet bench model

# Siemens OpenRecon package: label + PDF manual (always), then docker build/save and the zip
# (needs Docker Engine < 25; without docker it stops with an error after the label and manual).
openrecon: install
	$(BIN)/varnet openrecon package --out-dir dist/openrecon

# Wheels for a CUDA machine that cannot download (Python 3.12 there, PyTorch already installed):
# what the package and its GPU checks import beyond that image, and setuptools to install the checkout
# editable there. Used by experiments/gpu/scripts/gpu_checks.sh.
GPU_WHEELS := ismrmrd==1.15.0 xsdata==26.10 gadgetron==1.4.1 multimethod==2.1 pyFFTW==0.15.1 \
              nibabel==5.4.2 nilearn==0.14.1 fastmri==0.3.0 pydicom==3.0.2 setuptools==84.2.1
gpu-wheels: install
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) demo_out site *.egg-info .pytest_cache
