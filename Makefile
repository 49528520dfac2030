# The two commands of the README: `make demo` (set up .venv, run the demo job) and `make test`.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.curate-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curate run pipelines/jobs/demo.yaml --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks all --quick

clean:
	rm -rf runs .pytest_cache
