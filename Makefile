# Two commands for a fresh machine (Python 3.11 + pip, CPU, only PyPI reachable):
#   make demo   # create .venv, pretrain the demo backbone once, run the main job, print a table
#   make test   # create .venv if missing, run the test suite
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demos methods-demo clip-demo clip-quickstart audio-demo seg-demo pde-demo restore-demo caption-demo test test-slow docs venv clean-runs

# LOG_DIR=DIR puts a demo's runs under DIR (make demos gives each demo its own folder)
LOG_ARG = $(if $(LOG_DIR),paths.log_dir=$(LOG_DIR))

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench,seg,pde,restore,audio,audio-test,caption,export,docs]"
	touch $(STAMP)

checkpoints/upstream/vit_demo.safetensors: | $(STAMP)
	$(PY) train.py experiment=upstream

demo: $(STAMP) checkpoints/upstream/vit_demo.safetensors
	$(PY) train.py experiment=quickstart $(LOG_ARG)

# the ten newer methods (issue #26) next to LoRA on the same task and backbone, 5 epochs (~10 min on 2 cores)
methods-demo: $(STAMP) checkpoints/upstream/vit_demo.safetensors
	$(PY) train.py experiment=methods_demo $(LOG_ARG)

checkpoints/captioning/coca_tiny.safetensors: | $(STAMP)
	$(PY) train.py experiment=caption_upstream

caption-demo: $(STAMP) checkpoints/captioning/coca_tiny.safetensors
	$(PY) train.py experiment=caption_quickstart $(LOG_ARG)

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
checkpoints/clip/tiny_shapes_p4_s1000.safetensors: | $(STAMP)
	$(PY) -m tasks.pretrain.clip

clip-demo clip-quickstart: $(STAMP) checkpoints/clip/tiny_shapes_p4_s1000.safetensors
	$(PY) train.py experiment=clip_quickstart $(LOG_ARG)

checkpoints/audio/ast_demo.safetensors: conf/backbone/ast_demo.yaml conf/experiment/audio_upstream.yaml | $(STAMP)
	$(PY) train.py experiment=audio_upstream

audio-demo: $(STAMP) checkpoints/audio/ast_demo.safetensors
	$(PY) train.py experiment=audio_quickstart $(LOG_ARG)

checkpoints/seg/tiny_sam.pth: | $(STAMP)
	$(PY) train.py experiment=seg_upstream

seg-demo: $(STAMP) checkpoints/seg/tiny_sam.pth
	$(PY) train.py experiment=seg_quickstart $(LOG_ARG)

checkpoints/pde/morph_tiny_pretrained.safetensors: | $(STAMP)
	$(PY) train.py experiment=pde_pretrain

pde-demo: $(STAMP) checkpoints/pde/morph_tiny_pretrained.safetensors
	$(PY) train.py experiment=pde_quickstart $(LOG_ARG)

checkpoints/restoration/nafnet_w16_prod.safetensors: | $(STAMP)
	$(PY) train.py experiment=restore_pretrain

restore-demo: $(STAMP) checkpoints/restoration/nafnet_w16_prod.safetensors
	$(PY) train.py experiment=restore_quickstart $(LOG_ARG)

# Every modality's demo in sequence (pretraining included where its checkpoint is missing), then one
# combined table (python -m tasks.demos): its runs and summary.md under logs/demos/<time>/.
DEMOS_DIR := logs/demos/$(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_TARGETS = demo clip-demo audio-demo seg-demo pde-demo restore-demo caption-demo

demos: $(STAMP)
	@for t in $(DEMO_TARGETS); do \
		echo "== make $$t ($(DEMOS_DIR)/$$t)"; \
		$(MAKE) --no-print-directory $$t LOG_DIR=$(DEMOS_DIR)/$$t || exit 1; \
	done
	$(PY) -m tasks.demos $(DEMOS_DIR)
