# The two commands of the quick start: `make demo` and `make test`, and `make test-fast`
# for local work; `make federation` (as root) is the third demo: two facilities in network
# namespaces, real endpoint daemons, a Prefect server and worker (docs/federation.md).
# Each creates or updates the virtual environment it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=
FEDERATION_ARGS ?=
BENCH_WORLD_ARGS ?=

.PHONY: demo test test-fast federation bench-world clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "scistream-prefect needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
	  { echo "could not create $(VENV): on Debian, apt-get install python3-venv"; exit 1; }
	@$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	@echo "installing scistream-prefect (client) into $(VENV) ..."
	@$(BIN)/pip install --quiet -e '.[client]'
	@touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	@echo "installing scistream-prefect (client, gateway, docker, dev) into $(VENV) ..."
	@$(BIN)/pip install --quiet -e '.[client,gateway,docker,dev]'
	@touch $@ $(DEMO_STAMP)

# Byte-compiled ahead: a relay or gateway worker started with PYTHONDONTWRITEBYTECODE
# set would otherwise compile its modules on every start (about 30 ms of a relay's).
COMPILE := $(BIN)/python -m compileall -q proxy gateway_functions scistream_prefect > /dev/null

demo: $(DEMO_STAMP)
	@$(COMPILE)
	$(BIN)/scistream demo

# Installs the backends' Debian packages if missing (as root), starts a private Docker
# engine if none answers, builds the container images, runs the suite, stops the engine.
test: $(TEST_STAMP)
	@$(COMPILE)
	$(BIN)/ruff check .
	scripts/with-test-env $(BIN)/python $(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier for local work: no Docker engine, no root, none of the tests marked slow
# (each of those has a smaller sibling here, so every module is still exercised).
test-fast: $(TEST_STAMP)
	@$(COMPILE)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not docker and not root" $(PYTEST_ARGS)

# Builds the two-facility world, streams 1 GiB through it from a deployment run, tears it
# down and prints one JSON line last (bytes, checksum_ok, tls, setup_s, setup_round_trips,
# left). As root; installs the broker (rabbitmq-server) and nft if missing.
federation: $(TEST_STAMP)
	@$(COMPILE)
	@[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v nft >/dev/null || { \
	  echo "installing rabbitmq-server and nftables ..."; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server nftables >/dev/null; }
	PYTHONPATH=tests $(BIN)/python -m world $(FEDERATION_ARGS)

# The control-plane bench through that world (bench/controlplane.py --world): setup at 0
# and 50 ms per web-service request, per-call overhead, iperf3 through a stream against
# direct over the WAN. As root; installs what `federation` does, and iperf3.
bench-world: $(TEST_STAMP)
	@$(COMPILE)
	@[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v nft >/dev/null && \
	  command -v iperf3 >/dev/null || { \
	  echo "installing rabbitmq-server, nftables and iperf3 ..."; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server nftables \
	  iperf3 >/dev/null; }
	$(BIN)/python bench/controlplane.py --world $(BENCH_WORLD_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
