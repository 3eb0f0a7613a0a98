# ddpm: two commands on a fresh machine.
#   make demo   create .venv, install, train the default config on digits, sample a grid
#   make test   same install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: help install demo test clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: anything that lets pip choose torch may pull a multi-GB CUDA build
	$(PY) -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev,submitit,optuna,diffusers]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package (no work the second time)

demo: $(STAMP)  ## train the default config (digits, CPU, ~5 min) into outputs/runs/demo and sample a grid
	@# an earlier demo run is kept, renamed with its time, never deleted
	if [ -d outputs/runs/demo ]; then mv outputs/runs/demo outputs/runs/demo.$$(date +%Y%m%d-%H%M%S); fi
	$(PY) train.py name=demo
	$(PY) sample.py ckpt=outputs/runs/demo n=64 sampler=dpmsolver++sde steps=20 spacing=uniform out_dir=outputs/runs/demo/sample
	@echo "demo grid: outputs/runs/demo/sample/grid.png (training grids: outputs/runs/demo/samples/)"

test: $(STAMP)  ## run the test suite
	# one thread per process: the tests run small ops, where a second (possibly busy) core only adds waiting;
	# two workers, one file each at a time (a file's fixtures are built once), use both cores
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

clean:  ## remove the virtual environment
	rm -rf $(VENV)
