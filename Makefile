# Two commands for a fresh machine (Python 3.11 + pip, CPU, only PyPI reachable):
#   make demo   # create .venv, pretrain the demo backbone once, run the main job, print a table
#   make test   # create .venv if missing, run the test suite
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo clip-demo clip-quickstart audio-demo seg-demo pde-demo restore-demo caption-demo test test-slow docs venv clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench,seg,pde,restore,audio,audio-test,caption,export,docs]"
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

# the documentation site (docs/, mkdocs.yml) into site/; strict: a broken link or API reference fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean-runs:
	rm -rf logs

# One offline quickstart per modality (a few minutes each; not part of `make demo`): a tiny
# backbone pretrained once on a different generated task, then adapters compared on the embedded one.
checkpoints/clip/tiny_shapes_p4.safetensors: | $(STAMP)
	$(PY) -m tasks.pretrain.clip

clip-demo clip-quickstart: $(STAMP) checkpoints/clip/tiny_shapes_p4.safetensors
	$(PY) train.py experiment=clip_quickstart

checkpoints/audio/ast_demo.safetensors: | $(STAMP)
	$(PY) train.py experiment=audio_upstream

audio-demo: $(STAMP) checkpoints/audio/ast_demo.safetensors
	$(PY) train.py experiment=audio_quickstart

checkpoints/seg/tiny_sam.pth: | $(STAMP)
	$(PY) train.py experiment=seg_upstream

seg-demo: $(STAMP) checkpoints/seg/tiny_sam.pth
	$(PY) train.py experiment=seg_quickstart

checkpoints/pde/morph_tiny_pretrained.safetensors: | $(STAMP)
	$(PY) train.py experiment=pde_pretrain

pde-demo: $(STAMP) checkpoints/pde/morph_tiny_pretrained.safetensors
	$(PY) train.py experiment=pde_quickstart

checkpoints/restoration/nafnet_w16_prod.safetensors: | $(STAMP)
	$(PY) train.py experiment=restore_pretrain

restore-demo: $(STAMP) checkpoints/restoration/nafnet_w16_prod.safetensors
	$(PY) train.py experiment=restore_quickstart
