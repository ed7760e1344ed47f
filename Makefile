# One entry point for people and CI. `make demo` and `make test` set everything up on a fresh
# Debian/Ubuntu machine (system packages via apt-get, Python packages in .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := g++ g++-aarch64-linux-gnu g++-arm-linux-gnueabihf gcc-arm-none-eabi qemu-user mosquitto
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := .boost/demo

.PHONY: setup demo test test-default test-slow bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The main job: build host keys, compile a zoo model for VTA (calibrate, quantize to int8, cut out
# the layers VTA runs, lower them to VTA programs), serve the store over HTTP with a local MQTT
# broker, start a device agent whose VTA is the simulator, deploy the model to it over MQTT
# (download, verify, load, golden test, activate) and ask the device for one inference.
demo: setup
	@mkdir -p $(DEMO)
	@[ -f .boost/keys/build.key ] || $(BIN)/boost-build keygen
	$(BIN)/boost-build zoo export digits_cnn -o $(DEMO)
	$(BIN)/boost-build compile $(DEMO)/digits_cnn.onnx --target vta --board sim \
		--inputs $(DEMO)/digits_cnn.npz -o $(DEMO)/digits_cnn.boost
	@$(BIN)/boost-build serve > $(DEMO)/serve.log 2>&1 & server=$$!; \
	BOOST_AGENT_DEVICE_ID=demo-device $(BIN)/boost-agent start > $(DEMO)/agent.log 2>&1 & \
	agent=$$!; \
	trap 'kill $$agent $$server 2>/dev/null; wait' EXIT; \
	$(BIN)/boost-build deploy $(DEMO)/digits_cnn.boost --to demo-device --wait 30 && \
	$(BIN)/boost-build infer demo-device digits_cnn --input $(DEMO)/digits_cnn.npz || \
	{ echo "--- serve.log"; tail -20 $(DEMO)/serve.log; echo "--- agent.log"; \
	  tail -20 $(DEMO)/agent.log; exit 1; }

# What CI runs (.ci/run): lint, the default suite, then the slow suites.
test: setup lint test-default test-slow

test-default: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

# Every benchmark figure, side by side: results.json, one PNG per figure and summary.md.
bench: setup
	$(BIN)/python -m tests.bench_suite --out .boost/bench

lint: setup
	$(BIN)/ruff check agent vta models tests
	$(BIN)/ruff format --check agent vta models tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .boost .pytest_cache .mypy_cache .ruff_cache
