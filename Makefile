# maskbridge: the two commands a newcomer needs are `make run` and `make test`.
# Every target installs what it is missing by itself and is safe to run twice.
# Run as root on Debian (chroot, runuser and apt-get need it).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEVSTACK := $(PY) -m bridge.devstack
# Tests run the bridge with short ring and confirm timeouts so that "nobody answers" and
# "nobody presses 1" take seconds, and
# with webhooks sent to the receiver the live tests run (tests/live/conftest.py).
# (Two checkouts can test side by side with their own addresses and ports: MB_TEST_WEBHOOK_URL.)
MB_TEST_WEBHOOK_URL ?= http://127.0.0.1:8099/hooks
# make run NODES=2 (start, status, call, stop too): Kamailio in front of that many nodes.
ifdef NODES
export MB_NODES := $(NODES)
endif
TEST_ENV := MB_RING_TIMEOUT=6 MB_CONFIRM_TIMEOUT=2 MB_WEBHOOK_URL=$(MB_TEST_WEBHOOK_URL)

.PHONY: help deps venv rootfs run start stop monitor status call cli carrier-cli logs psql admin bench test test-unit typecheck lint \
        compose-check compose-up compose-down clean bench-sizes

help:
	@echo "make run      the whole stack locally with demo data (Ctrl-C stops it)"
	@echo "make test     every test, including real calls through a real Asterisk"
	@echo "make bench    the bridge's cost next to plain Asterisk; report in docs/bench/"
	@echo "make start / make stop / make status    the stack in the background"
	@echo "make call FROM=<real number> TO=<pool number>    place a call from the simulated carrier"
	@echo "make cli | carrier-cli | logs | psql    for engineers"
	@echo "make monitor                            Prometheus on the running stack, with the alert rules"
	@echo "make admin ARGS='pool usage'            pool numbers and sessions (maskbridge-admin --help)"
	@echo "make compose-check                      build and run docker-compose.yml, real calls through it (part of make test)"
	@echo "make compose-up / compose-down          production-shaped stack (needs a docker engine and a registry)"

# --- installation -----------------------------------------------------------------

# Debian packages: debootstrap (builds the Asterisk 22 root file system), Postgres server
# binaries, Python venv support, Prometheus (its promtool checks the alert rules, and the
# live tests run one against the stack), SIPp (sip-tester: the benchmark's load generator),
# tcpdump (the benchmark's clock for SIP and its ear for RTP) and gettext-base (envsubst: the
# PBX image's entrypoint renders its templates with it, and a unit test runs it here) and
# iptables (the PBX's media guard: asterisk-config/media-guard.sh).
# Postgres is installed without its default cluster: the project keeps its own; no service
# the packages bring is started (policy-rc.d says no while apt runs).
deps:
	@missing=""; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v runuser >/dev/null || missing="$$missing util-linux"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v sipp >/dev/null || missing="$$missing sip-tester"; \
	command -v tcpdump >/dev/null || missing="$$missing tcpdump"; \
	command -v envsubst >/dev/null || missing="$$missing gettext-base"; \
	command -v iptables-restore >/dev/null || missing="$$missing iptables"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  mkdir -p /etc/postgresql-common; \
	  [ -f /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; guard=1; fi; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing ca-certificates debian-archive-keyring gpgv; \
	  status=$$?; [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; [ $$status -eq 0 ] || exit $$status; \
	fi; \
	id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql --shell /bin/bash postgres

$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $@

venv: $(VENV)/.installed

rootfs: deps venv
	$(DEVSTACK) rootfs

# --- the local stack --------------------------------------------------------------

run: deps venv
	$(DEVSTACK) run

start: deps venv
	$(DEVSTACK) start

stop: venv
	$(DEVSTACK) stop

# Prometheus on the running stack, with the alert rules (monitoring/); Ctrl-C stops it.
monitor: deps venv
	$(DEVSTACK) monitor

status: venv
	$(DEVSTACK) status

call: venv
	@[ -n "$(FROM)" ] && [ -n "$(TO)" ] || { echo "usage: make call FROM=<real number> TO=<pool number>"; exit 2; }
	$(DEVSTACK) call '$(FROM)' '$(TO)' $(if $(HANGUP_AFTER),--hangup-after $(HANGUP_AFTER))

cli: venv
	$(DEVSTACK) cli

carrier-cli: venv
	$(DEVSTACK) carrier-cli

# (the stack's in MB_STACK_DIR; with several nodes, every node's bridge log)
logs: venv
	$(DEVSTACK) logs

psql: venv
	$(DEVSTACK) psql

# The engineers' tool against the local stack, e.g. make admin ARGS="pool usage"
admin: venv
	$(DEVSTACK) admin $(ARGS)

# --- tests ------------------------------------------------------------------------

# The stack is (re)started with the test settings, the tests run, and the stack is
# stopped again whatever the outcome.
test: deps venv lint typecheck
	$(DEVSTACK) stop
	$(TEST_ENV) $(DEVSTACK) start >/dev/null
	status=0; $(TEST_ENV) $(PY) -m pytest -ra $(PYTEST_ARGS) || status=$$?; \
	$(DEVSTACK) stop; exit $$status

typecheck: venv
	$(PY) -m mypy bridge bench

# ruff: pyflakes, pycodestyle, bugbear and the rest of [tool.ruff] in pyproject.toml.
lint: venv
	$(PY) -m ruff check bridge bench tests

# The benchmark (bench/): the stack is restarted with default settings (but no API rate
# limit: it measures capacity), measured, and stopped; the report goes to docs/bench/.
# BENCH_ARGS=--tiny for a smoke run. SIPp places and answers the calls. SOAK=<seconds>: the
# leak check alone (steady calls that long, e.g. SOAK=1800), then the report again with it.
# NODES=2: the scale-out section instead (bench/scaleout.py; report docs/bench/scaleout.md).
BENCH_MODULE := $(if $(filter-out 1,$(or $(NODES),1)),bench.scaleout,bench)
bench: deps venv
	$(DEVSTACK) stop
	MB_API_RATE=0 $(DEVSTACK) start >/dev/null
	status=0; $(PY) -m $(BENCH_MODULE) $(BENCH_ARGS) $(if $(SOAK),--soak $(SOAK)) || status=$$?; \
	$(DEVSTACK) stop; exit $$status

# Session opens and the route lookup as the data grows (bench/sizes.py; report docs/bench/sizes.md):
# a database of its own on the local stack's Postgres, 10,000 pool numbers, up to 1,000,000
# past participants.
bench-sizes: deps venv
	$(DEVSTACK) start >/dev/null
	$(PY) -m bench.sizes $(BENCH_ARGS)

test-unit: venv
	$(PY) -m pytest -ra tests/unit $(PYTEST_ARGS)

# --- production shape: docker compose ---------------------------------------------

# docker-compose.yml built and run, with real calls through it (tests/compose; make test
# runs it too). Installs and starts a docker engine if there is none (Debian's docker.io,
# Compose v2 from Debian forky) and makes local stand-ins for the upstream base images,
# which no registry serves here; all of it is reused the next time. Skipped, with the
# reason, where no docker engine can run.
compose-check: deps venv
	$(PY) -m pytest -ra tests/compose $(PYTEST_ARGS)

# For a machine that reaches Docker Hub: the stack of docker-compose.yml (see docs/production.md).
compose-up:
	docker compose up -d --build

compose-down:
	docker compose down

clean: stop
	rm -rf .stack $(VENV)
