# Two commands for a fresh machine (Python 3.11 + pip, CPU, only PyPI reachable):
#   make demo   # create .venv, pretrain the demo backbone once, run the main job, print a table
#   make test   # create .venv if missing, run the test suite
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo caption-demo test test-slow venv clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench,seg,pde,audio,audio-test,caption]"
	touch $(STAMP)

checkpoints/upstream/vit_demo.safetensors: | $(STAMP)
	$(PY) train.py experiment=upstream

demo: $(STAMP) checkpoints/upstream/vit_demo.safetensors
	$(PY) train.py experiment=quickstart

checkpoints/captioning/coca_tiny.safetensors: | $(STAMP)
	$(PY) train.py experiment=caption_upstream

caption-demo: $(STAMP) checkpoints/captioning/coca_tiny.safetensors
	$(PY) train.py experiment=caption_quickstart

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean-runs:
	rm -rf logs

checkpoints/clip/tiny_shapes.safetensors: | $(STAMP)
	$(PY) -m tasks.clip_pretrain

clip-quickstart: $(STAMP) checkpoints/clip/tiny_shapes.safetensors
	$(PY) train.py experiment=clip_quickstart
