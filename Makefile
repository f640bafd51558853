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

test: $(VENV)/installed
	$(BIN)/python -m pytest -q

.PHONY: demo test
