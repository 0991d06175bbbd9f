# The two commands a newcomer runs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh $(DEMO_DIR)

test: setup
	@$(PY) -m pytest -q -x --durations=15 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
