# Every target sets up what it needs: a fresh machine runs `make demo` or `make test` directly.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench device-wheels redis-server chromium faketime clean

# The project itself is installed (editable, no dependencies: requirements.txt pins them)
# for its entry points: `celery -A tasks jobs ...` is found through `celery.commands`.
$(INSTALLED): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --editable .
	rm -f $(VENV)/.installed-*
	touch $@

# Tests and the demo start private redis-server processes; install it if it is missing.
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "redis-server missing: installing Debian's package"; \
		apt-get update -qq && apt-get install -y -qq redis-server; }

# The browser tests (Flower, the job and fleet pages) drive Debian's Chromium (Playwright cannot fetch browsers here).
chromium:
	@command -v chromium >/dev/null || { \
		echo "chromium missing: installing Debian's package"; \
		apt-get update -qq && apt-get install -y -qq chromium; }

# The clock tests run a host ten minutes off under Debian's libfaketime.
faketime:
	@test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 || { \
		echo "libfaketime missing: installing Debian's faketime"; \
		apt-get update -qq && apt-get install -y -qq faketime; }

demo: $(INSTALLED) redis-server
	$(PY) -m worker demo

# Four pytest processes on 2 cores: much of a test is waiting (for a worker to start, a lease
# or a sweep to expire), so two left the CPU idle (11:45 of pytest with 4 against 14:01
# with 2, before 80 more tests; 5 gained 13 s more). Each module is kept on one process (its
# stack is module-scoped), handed out in collection order: the modules marked `runs_long`
# first (tests/conftest.py), not xdist's default of the modules with the most tests first,
# which left the longest to run alone last.
test: $(INSTALLED) redis-server chromium faketime lint
	$(PY) -m pytest -n 4 --dist loadfile --no-loadscope-reorder

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: $(INSTALLED) redis-server
	$(PY) -m bench.job
	$(PY) -m bench.enhance
	$(PY) -m bench.references
	$(PY) -m bench.progress
	$(PY) -m bench.gpu
	$(PY) -m bench.faults
	$(PY) -m bench.lanes
	$(PY) -m bench.api
	$(PY) -m bench.failover
	$(PY) -m bench.batch
	$(PY) -m bench.long

# The wheels bench/device.sh installs on a lent GPU host (Python 3.12; PyTorch, transformers,
# accelerate and peft are there): the other packages bench.gpu imports, at this venv's
# versions ('.' stands for '-' or '_'), and torchao for the fp8 set.
DEVICE_WHEELS := diffusers|pydantic|pydantic.(core|settings)|python.dotenv|ftfy|wcwidth|typing.(inspection|extensions)|annotated.types|importlib.metadata
device-wheels: $(INSTALLED)
	{ $(PY) -m pip freeze | grep -iE '^($(DEVICE_WHEELS))=='; \
	  grep '^torchao==' requirements-gpu.txt; } > .device-wheels.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .device-wheels -r .device-wheels.txt
	rm .device-wheels.txt

clean:
	rm -rf $(VENV) .demo spool outputs
