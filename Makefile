# Two entry points for a fresh machine (see README):
#   make demo   set up the venv, build the embedded default dataset, run the whole lineage
#   make test   set up the venv (with test extras and Chromium), run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export CURATION_HOME ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test ui bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first: the pinned pair (on disk here for Python 3.11); any other torch version pulls GBs.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/curation demo

# The browser test drives Debian's Chromium; install it when missing (needs apt as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

# Two workers, one test file each at a time (pytest-xdist --dist loadfile): the suite spends much
# of its time waiting on the processes it starts (daemons, dagster runs, the browser), so on a
# 2-core box it used 0.78 cores in series (876-1020 s) and 1.36 on two workers (585 s).
PYTEST_WORKERS ?= 2
test: install chromium
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

ui: install
	$(BIN)/curation ui

bench: install
	$(BIN)/python benchmarks/embed_throughput.py
	$(BIN)/python benchmarks/prune_scale.py --repeat 3

clean:
	rm -rf $(VENV) data dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
