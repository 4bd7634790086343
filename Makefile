# Two entry points: `make demo` (the main job on the local store) and `make test`.
# Both install what they need: Debian packages (as root) and a private venv in .venv.
# Go and containerd's Go sources are for containerd's own snapshotter conformance suite, built
# against cafs (tests/conformance); stargz-snapshotter's library and ctr-remote for the peer
# the cold-start benchmark and its test build (bench/stargz).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := containerd runc fuse3 libfuse3-dev pkg-config docker-registry busybox-static umoci \
        skopeo iproute2 python3.11 python3-minimal python3.11-dev python3.11-venv gcc git kmod \
        e2fsprogs erofs-utils mount util-linux-extra \
        golang-go golang-github-containerd-containerd-dev \
        golang-github-containerd-stargz-snapshotter-dev stargz-snapshotter python3-numpy
PYFUSE3 := $(shell cat contrib/pyfuse3/VERSION)
STAMP_DEBS := .make/debs
STAMP_VENV := .make/venv

.PHONY: deps demo test install lint bench clean pyfuse3-patched bytecode

$(STAMP_DEBS): Makefile
	@mkdir -p .make
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	missing=$$(echo $$missing); \
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
	$(MAKE) --no-print-directory pyfuse3-patched
	@touch $@

# Bytecode for our own packages, as an installed cafs has (an editable install has none, and
# PYTHONDONTWRITEBYTECODE keeps imports from writing it): every cafs process otherwise
# compiles its modules from source at start, ~40 ms of a short command.
bytecode: $(STAMP_VENV)
	@$(BIN)/python -m compileall -q blobstore indexer cafs snapshotter bench

# pyfuse3 built from source with contrib/pyfuse3's patches: read and readdir get the inode when
# there is no file handle, so mounts can decline open/opendir and have the kernel cache
# directory listings; a read may answer with (fd, offset, length), which libfuse splices from
# that file, without Python touching the bytes. Without them cafs still works, with more
# requests, copies and CPU. The release is pinned in contrib/pyfuse3/VERSION and the patches
# listed in order in contrib/pyfuse3/series; check.py says whether the build is that one.
PYFUSE3_PATCHES := $(addprefix contrib/pyfuse3/,$(shell cat contrib/pyfuse3/series))
pyfuse3-patched:
	@if $(BIN)/python contrib/pyfuse3/check.py 2>/dev/null; then exit 0; fi; \
	set -e; rm -rf build/pyfuse3 && mkdir -p build/pyfuse3; \
	$(BIN)/pip download -q --no-deps --no-binary pyfuse3 -d build/pyfuse3 pyfuse3==$(PYFUSE3); \
	tar xzf build/pyfuse3/pyfuse3-$(PYFUSE3).tar.gz -C build/pyfuse3; \
	for p in $(PYFUSE3_PATCHES); do git apply --directory=build/pyfuse3/pyfuse3-$(PYFUSE3) --unsafe-paths $$p; done; \
	echo "building pyfuse3 $(PYFUSE3) with $(PYFUSE3_PATCHES)"; \
	$(BIN)/pip install -q --no-deps build/pyfuse3/pyfuse3-$(PYFUSE3)

deps: $(STAMP_VENV) pyfuse3-patched bytecode

demo: deps
	$(BIN)/python -m bench.demo

test: deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# `cafs` on the PATH: a link to the venv's entry point (it runs with the venv's Python).
PREFIX ?= /usr/local
install: deps
	ln -sf $(CURDIR)/$(BIN)/cafs $(PREFIX)/bin/cafs
	@echo "cafs is $(PREFIX)/bin/cafs -> $(CURDIR)/$(BIN)/cafs"

# The code is laid out by hand within ruff's line length; `ruff format` would rewrap 137
# files (+2,800 lines), so lint is ruff's rules and mypy, as `make test` runs them.
lint: deps
	$(BIN)/ruff check . && $(BIN)/mypy

bench: deps
	$(BIN)/python -m bench run $(BENCH_ARGS)

clean:
	rm -rf .make $(VENV) build *.egg-info
