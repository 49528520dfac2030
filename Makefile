# The two commands of the README: `make demo` (set up .venv, run the demo job) and `make test`.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.curate-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench docs clean

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
# (about 5 to 11 minutes on 2 cores); not part of the demo's setup. Built portable (GGML_NATIVE=OFF):
# the wheel pip builds by default is tuned to the build machine, and on an Intel Xeon with AMX that
# build died (SIGSEGV) on its first request. The wheel is kept in LLAMA_WHEELS so fresh clones reuse
# it: pip's own wheel cache would hand back a native wheel built earlier, whatever CMAKE_ARGS say.
LLAMA_STAMP := $(VENV)/.llama-server-installed
LLAMA_VERSION := 0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/curate/llama-cpp-portable
$(LLAMA_STAMP): $(DEV_STAMP)
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "test setup: compiling llama.cpp for llama-cpp-python[server] (once; about 5 to 11 min on 2 cores)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(VENV)/bin/python -m pip wheel --quiet --disable-pip-version-check \
	    --no-cache-dir --no-deps -w $(LLAMA_WHEELS) 'llama-cpp-python==$(LLAMA_VERSION)'; \
	fi
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --find-links $(LLAMA_WHEELS) \
	  --only-binary llama-cpp-python 'llama-cpp-python[server]==$(LLAMA_VERSION)'
	touch $(LLAMA_STAMP)

test: $(DEV_STAMP) $(LLAMA_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=20

# The documentation site: the reference pages regenerated from the code, then MkDocs (Material)
# into site/, offline; --strict turns every warning (a broken link, a page not in the nav) into a failure.
docs: $(DEV_STAMP)
	$(VENV)/bin/python -m curate.reference docs/reference
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(DEV_STAMP)
	$(VENV)/bin/python -m benchmarks all --quick

clean:
	rm -rf runs .pytest_cache site
