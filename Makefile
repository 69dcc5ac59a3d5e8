# insitu: two commands.  `make demo` sets everything up and runs the default job;
# `make test` runs the test suite (the same command .ci/run uses).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the CPU build of torch 2.13.0 lies on local disk on our machines; elsewhere pip finds it on PyPI
PIP_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test docs bench clean

$(BIN)/insitu: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_LINKS) -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(BIN)/insitu

setup: $(BIN)/insitu

demo: setup
	$(BIN)/insitu simulate --recipe consortium

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site   # broken links and anchors fail the build

clean:
	rm -rf $(VENV) runs site
