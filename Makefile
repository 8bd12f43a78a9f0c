# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv with the pinned versions from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-blender venv venv-test face-landmarker

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# LPIPS's per-channel weights ship in the lpips package. Its code builds AlexNet through
# torchvision, which has no wheel for the pinned CPU build of torch, so it is installed
# without dependencies: backend/refine/perceptual.py reads its weight file, and a test runs
# its code against ours.
LPIPS := 0.1.4

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps lpips==$(LPIPS)
	touch $@

# mediapipe's face_landmarker.task (Apache-2.0; not in the mediapipe wheel, never downloaded)
# is kept with the project's shared models, not in git: copied beside the code that reads it
# when it is there (backend/tracking/models/README.md); that code checks its SHA-256.
FACE_LANDMARKER_FROM ?= ../shared/models/face_landmarker.task
FACE_LANDMARKER := backend/tracking/models/face_landmarker.task

face-landmarker:
	@if [ -f $(FACE_LANDMARKER_FROM) ] && ! cmp -s $(FACE_LANDMARKER_FROM) $(FACE_LANDMARKER); then cp $(FACE_LANDMARKER_FROM) $(FACE_LANDMARKER); fi

$(VENV)/.blender: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[blender]"
	touch $@

# Triton's interpreter runs the fused GPU kernels on the CPU in the tests. A CUDA build of
# torch brings the Triton it was built with; for a CPU build this one goes into a folder of
# its own, which only the interpreter tests' subprocesses see: installed in the venv, torch
# would import it in every process (with torch.optim), and beside bpy and mediapipe that
# crashed the test run.
TRITON := 3.9.0
TRITON_INTERPRETER := $(VENV)/triton-interpreter

$(VENV)/.test: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps --target $(TRITON_INTERPRETER) triton==$(TRITON)
	touch $@

venv: $(VENV)/.base face-landmarker
venv-test: $(VENV)/.test face-landmarker

# The demo builds and renders a .blend, so it needs Blender as a module (the blender extra).
demo: $(VENV)/.blender face-landmarker
	$(BIN)/spatialavatar demo --out out

# pytest exits 5 when it collected no test: that is a failure here.
test: venv-test
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing"; exit 1; fi; exit $$rc

# The Blender-facing tests on another Blender release, in a venv of its own:
#   make test-blender BPY=4.2.23    (bpy 4.2 to 5.0 are built for Python 3.11)
BPY ?= 4.5.3
BPY_VENV := .venv-bpy-$(BPY)

$(BPY_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(BPY_VENV)
	$(BPY_VENV)/bin/python -m pip install -q --upgrade pip
	$(BPY_VENV)/bin/python -m pip install -q -e . pytest==9.2.0 hypothesis==6.170.15 bpy==$(BPY)
	touch $@

test-blender: $(BPY_VENV)/.ready
	$(BPY_VENV)/bin/python -m pytest -q -m blender; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing"; exit 1; fi; exit $$rc
