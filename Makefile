# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedrad-installed
SYSTEM := $(VENV)/.system-packages
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO   := demo-out
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned version is a local CPU build; unpinned would pull CUDA.
	$(PIP) torch==2.13.0 numpy versioneer setuptools wheel
	# pyradiomics is a source release whose build needs numpy/versioneer already present.
	$(PIP) --no-build-isolation pyradiomics
	$(PIP) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/fedrad demo --out $(DEMO)

# loadfile: a test file's federation (SuperLink + SuperNodes) serves all its tests on one worker. Two workers on
# two cores: four were slower (the CNN and Flower processes compete); three took 31.5 min against 29.7 with two
# (2026-12-03, load average 13 with three).
# Debian packages the tests drive for real: chromium (the dashboard, through playwright; no browser
# download) and nginx (the proxy in deploy/). Installed only when missing.
# kubectl renders deploy/k8s (kustomize), openssl and ssh-keygen make the consortium's credentials. Only the missing
# ones (chattr: a read-only --out for root in the prepare tests): a kubectl from another package (google-cloud-sdk's) would conflict with Debian's kubernetes-client.
$(SYSTEM): $(STAMP)
	missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v ssh-keygen >/dev/null || missing="$$missing openssh-client"; \
	command -v chattr >/dev/null || missing="$$missing e2fsprogs"; \
	[ -z "$$missing" ] || { export DEBIAN_FRONTEND=noninteractive; $(SUDO) apt-get install -y -q $$missing || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; }; }
	touch $(SYSTEM)

test: $(STAMP) $(SYSTEM)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=8 tests

bench: $(STAMP)
	$(BIN)/python bench/extraction.py
	$(BIN)/python bench/federation.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/cnn.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
