# flexgw: `make run` starts the gateway with the quickstart example; `make test` runs the suite.
# `make run GATEWAY_CONF="DIR ..." UPSTREAM_LISTEN=HOST:PORT GATEWAY_ARGS="--admin off"` serves
# other conf dirs (README: "Try the examples"); `make validate` checks GATEWAY_CONF.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOURCES := $(shell find flexgw twisted -name '*.py' -o -name '*.json') setup.cfg pyproject.toml
GATEWAY_CONF ?= conf/quickstart
UPSTREAM_LISTEN ?= 127.0.0.1:8082
GATEWAY_ARGS ?=
# The reactor `make run` uses: flexgw's (flexgw/compat/epollreactor.py, also `twistd flexgw`'s
# default); `make run REACTOR=epoll` runs on Twisted's own epoll reactor.
REACTOR ?= flexgw
# `make test` runs the suite once per reactor named here (flexgw's, then Twisted's stock epoll
# reactor, which `twistd --reactor epoll flexgw` selects); `make test TEST_REACTORS=flexgw` once.
TEST_REACTORS ?= flexgw epoll

.PHONY: run validate test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet '.[test]'
	touch $@

install: $(VENV)/.installed

# The quickstart example proxies to a small echo upstream shipped in the package.
run: install
	@$(BIN)/python -m flexgw.testing.upstream --listen $(UPSTREAM_LISTEN) --mode echo & \
	upstream=$$!; trap 'kill $$upstream 2>/dev/null' EXIT INT TERM; \
	$(BIN)/twistd --nodaemon --pidfile= --reactor $(REACTOR) flexgw $(addprefix --conf ,$(GATEWAY_CONF)) $(GATEWAY_ARGS)

validate: install
	$(BIN)/flexgw validate $(GATEWAY_CONF)

test: install
	@set -o pipefail; status=0; logs=; \
	for reactor in $(TEST_REACTORS); do \
	  rm -rf _trial_temp; echo "== trial --reactor $$reactor"; \
	  $(BIN)/python -m twisted.trial --reactor $$reactor --jobs 2 tests 2>&1 \
	    | tee .trial.$$reactor.log || status=1; \
	  logs="$$logs .trial.$$reactor.log"; \
	done; \
	$(BIN)/python tools/trial_summary.py $$logs; exit $$status

lint: install
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check flexgw tests bench tools

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .trial.log .trial.*.log
