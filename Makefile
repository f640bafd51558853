# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/installed
	$(BIN)/python run.py --one images/one.png --two images/two.png --out out.png
	@echo "wrote out.png: the frame halfway between images/one.png and images/two.png"

# Two workers, one per core of a 2-core machine (CI's), each on one thread.
test: $(VENV)/installed
	$(BIN)/python -m pytest -q -n 2

# The GPU round (docs/gpu.md): `make gpu-round` on a CUDA machine writes to $OUT or to
# ARGS=FOLDER; `make gpu-round ARGS="--dry-run FOLDER"` tries it on the CPU. It runs with the project's
# .venv where there is one, else with python3 (as on a GPU machine that has torch but no .venv).
ROUND_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-round:
	$(ROUND_PYTHON) gpu_round.py $(ARGS)

# Fill the git-ignored gpu-carry/ with training clips, for a remote GPU machine that receives a copy of the
# working tree, and print what to send along.
gpu-carry: $(VENV)/installed
	$(BIN)/python gpu_round.py --carry

.PHONY: demo test gpu-round gpu-carry
