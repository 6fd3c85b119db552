# The two commands of the README's quick start: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test install lint demo-model clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the Label Studio ML backend on the bundled demo checkpoint (port 9090).
serve: $(STAMP)
	$(BIN)/nextchat serve --port $${PORT:-9090}

## Run every test (real Redis, Celery worker, Label Studio server included).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy nextchat_core labelstudio training backend nextchat_cli

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

## Train the demo checkpoint from scratch (resumable) and ship it to models/demo. RECIPE=shipped
## (default): the phases that made the bundled model (wall time per phase: models/demo/metrics.json);
## RECIPE=90min: the recipe sized to 90 minutes on 2 CPU cores (docs/demo-recipe.md); with
## MINUTES=90 its language cycle takes the steps the minutes leave on THIS machine.
RECIPE ?= shipped
MINUTES ?=
demo-model: $(STAMP)
	$(BIN)/python -m training.demo --recipe $(RECIPE) --out runs/demo-$(RECIPE)$(if $(MINUTES),-$(MINUTES)min) \
		$(if $(MINUTES),--minutes $(MINUTES)) --ship models/demo
