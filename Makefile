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

# The test and benchmark tools (dev extras; chromium for the report rendering test): not the demo's.
DEV_STAMP := $(VENV)/.curate-dev-installed
$(DEV_STAMP): $(STAMP)
	bash scripts/setup.sh --dev
	touch $(DEV_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curate run pipelines/jobs/demo.yaml --overwrite

# The real teacher-server tests need llama.cpp's OpenAI-compatible server. pip compiles llama.cpp
# on the first install (about 8 minutes on 2 cores) and caches the wheel; not part of the demo's setup.
LLAMA_STAMP := $(VENV)/.llama-server-installed
$(LLAMA_STAMP): $(DEV_STAMP)
	@echo "test setup: installing llama-cpp-python[server] (compiles llama.cpp once, about 8 min on 2 cores)"
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'llama-cpp-python[server]'
	touch $(LLAMA_STAMP)

test: $(DEV_STAMP) $(LLAMA_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=20

bench: $(DEV_STAMP)
	$(VENV)/bin/python -m benchmarks all --quick

clean:
	rm -rf runs .pytest_cache
