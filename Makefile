# Two entry points: `make demo` (the main job on the local store) and `make test`.
# Both install what they need: Debian packages (as root) and a private venv in .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := containerd runc fuse3 libfuse3-dev pkg-config docker-registry busybox-static umoci \
        iproute2 python3.11 python3-minimal kmod e2fsprogs
STAMP_DEBS := .make/debs
STAMP_VENV := .make/venv

.PHONY: deps demo test lint bench clean

$(STAMP_DEBS):
	@mkdir -p .make
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run as root or install them)"; exit 1; fi; \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMP_VENV): pyproject.toml $(STAMP_DEBS)
	@mkdir -p .make
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

deps: $(STAMP_VENV)

demo: deps
	$(BIN)/python -m bench.demo

test: deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -rs $(PYTEST_ARGS)

lint: deps
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: deps
	$(BIN)/python -m bench run $(BENCH_ARGS)

clean:
	rm -rf .make $(VENV) build *.egg-info
