PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint results gate-validation screenshots clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine; any looser request pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The dashboard's browser test drives Debian's Chromium through ChromeDriver (no browser download at test time)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium chromium-driver >/dev/null \
	      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	  else echo "the browser test needs chromium and chromium-driver (sudo apt-get install chromium chromium-driver)"; fi; \
	fi

demo: setup
	$(BIN)/dopsd demo

test: setup
	$(BIN)/python -m pytest -q

# D-OPSD vs SFT, continual learning and the recipe sweep on the toy model: docs/RESULTS.md and
# bench/results/{paper_table,recipe_sweep}.json (about an hour on 2 idle cores)
results: setup
	SEEDS=3 $(BIN)/python bench/paper_table.py
	SEEDS=2 $(BIN)/python bench/recipe_sweep.py

# The gate judged by ground truth: the zoo of rounds, then the calibration (docs/RESULTS.md and
# bench/results/gate_{zoo,validation}.json; about 45 minutes on 2 idle cores)
gate-validation: setup
	rm -f bench/results/gate_zoo.json
	cd bench && ../$(BIN)/python gate_zoo.py && ../$(BIN)/python gate_zoo.py --calibrate

lint: setup
	$(BIN)/ruff check dopsd_continual tests bench

# The dashboard's screenshots in docs/ (README), taken by its browser test
screenshots: setup
	DOPSD_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_ui_browser.py

clean:
	rm -rf $(VENV)
