# The two commands of the README:  `make book`  and  `make test`.
# Both create (or reuse) .venv and install the package with every extra.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book preview test lab lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	touch $(STAMP)

## The published book (full mode) into _build/html.
book: $(STAMP)
	NESTED_LAB_QUICK=0 $(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going

## A quick preview: same book, quick-mode sizes, into _build/preview/_build/html.
preview: $(STAMP)
	NESTED_LAB_QUICK=1 $(BIN)/jupyter-book build . --path-output _build/preview --warningiserror --nitpick --keep-going

## Every test: unit, notebooks (nbval), papermill, book and browser.
test: $(STAMP)
	NESTED_LAB_QUICK=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf _build
