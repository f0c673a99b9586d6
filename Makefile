# corfs: set-up, tests, demo, benchmarks. Run as root on Debian 12.
#   make demo     set up, then mount a sample image and show copy-on-read at work
#   make test     set up, then the whole test suite (slow tests included)
#   make check    set up, then the fast tests (-m "not slow"), ruff and mypy
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
RUFF := $(VENV)/bin/ruff
MYPY := $(VENV)/bin/mypy
LINT_PATHS = $(wildcard corfs tests bench scripts)
PYTEST_ARGS ?=
# One pytest-xdist worker per core: most tests wait on QEMU, servers or the disk. A module
# stays on one worker (loadfile: the tests' libvirtd, one per machine, per module); tests
# that ask every mount of the machine (marker `alone`) run after the others, in one process.
XDIST := -n auto --dist loadfile
# Peers compared by bench/peers.py (Debian 12 packages), installed by `make bench` only:
# nbdkit has its curl plugin, libnbd-bin nbdfuse, qemu-block-extra QEMU's http(s) driver.
BENCH_PACKAGES := httpdirfs rclone nbdkit libnbd-bin qemu-block-extra
# pytest exit code 5 means "no tests ran": say so plainly (.ci/run looks for this line).
NO_TESTS_MSG := corfs: pytest exit code 5: no tests were run
RUN_PYTEST = $(PYTEST) -q $(1) $(PYTEST_ARGS) || { rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "$(NO_TESTS_MSG)" >&2; fi; exit $$rc; }
# The `alone` part: none of them among what PYTEST_ARGS selects is fine.
RUN_PYTEST_ALONE = $(PYTEST) -q $(1) $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] || exit $$rc; }

.PHONY: all setup test check lint demo bench mutants clean

all: check

setup:
	@scripts/setup.sh

test: setup
	@$(call RUN_PYTEST,$(XDIST) -m "not alone")
	@$(call RUN_PYTEST_ALONE,-m alone)

check: setup
	@$(call RUN_PYTEST,$(XDIST) -m "not slow and not alone")
	@$(call RUN_PYTEST_ALONE,-m "alone and not slow")
	$(RUFF) check $(LINT_PATHS)
	$(MYPY)

lint: setup
	$(RUFF) check $(LINT_PATHS)
	$(MYPY)

mutants: setup
	$(PY) scripts/mutants.py $(MUTANTS)

demo: setup
	contrib/demo.sh

bench: setup
	@missing=$$(for p in $(BENCH_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends $$missing; fi
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
