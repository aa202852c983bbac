# Two commands for people: `make demo` and `make test`. `make install` is what both run first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mwm-installed
# The PyTorch build this project is tested with; override for another platform, e.g.
# make install TORCH="torch==2.9.1 torchvision==0.24.1"
TORCH ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
# The x86_64 build of torch 2.14.1 is a CUDA build: about 6 GB in the venv. Say so up front
# when the disk is short, so that pip's "No space left on device" is not a mystery.
define DISK_CHECK
import shutil
free = shutil.disk_usage(".").free / 2**30
if free < 7:
    print(f"warning: {free:.1f} GiB free here; the venv with PyTorch needs about 7 GiB. "
          "If pip fails with 'No space left on device', free disk space (or remove an "
          "old .venv) and run make again.")
endef
export DISK_CHECK

.PHONY: install demo test clean browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PYTHON) -c "$$DISK_CHECK"
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --no-cache-dir --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/mwm demo

test: install browser
	$(PY) -m pytest -q

# The report's browser test renders it in headless Chromium. Install Debian's package when
# it is missing and we can (root or password-less sudo); otherwise say so and go on: the
# test then skips with the same message.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n")
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( ( $(SUDO) apt-get install -y -qq chromium || ( $(SUDO) apt-get update -qq && \
	      $(SUDO) apt-get install -y -qq chromium ) ) >/dev/null 2>&1 && echo "installed Chromium" ) || \
	  echo "note: could not install Chromium (needs apt and root); the report's browser test will be skipped"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
