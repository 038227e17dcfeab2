# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs omnilabel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first and pinned as a pair (torchvision must match torch).
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-out

.PHONY: install test demo lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check omnilabel tests bench

demo: install
	bash examples/demo.sh $(VENV)/bin/omnilabel $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
