PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo's environment: the container's CPU runtime set alone (no torch, nnU-Net or MONAI).
DEMO_VENV := .venv-demo
DEMO_BIN := $(DEMO_VENV)/bin
DEMO_STAMP := $(DEMO_VENV)/.installed

.PHONY: venv test test-fast demo bench clean
DEMO := demo-out

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml requirements-cpu.txt
	$(PY) -m venv $(DEMO_VENV)
	$(DEMO_BIN)/pip install --quiet --upgrade pip
	$(DEMO_BIN)/pip install --quiet -r requirements-cpu.txt -e .
	touch $(DEMO_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The edit loop: everything but the slow, torch and GPU tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not torch and not gpu"

demo: $(DEMO_STAMP)
	rm -rf $(DEMO)
	$(DEMO_BIN)/hnseg phantom --seed 1 --fov whole-body --out $(DEMO)/case
	$(DEMO_BIN)/python process.py --input $(DEMO)/case/input --output $(DEMO)/output --weights weights/demo \
		--report $(DEMO)/report.json --qc $(DEMO)/qc.png --device cpu
	$(DEMO_BIN)/hnseg evaluate --pred $(DEMO)/output/images/tumor-lymph-node-segmentation/output.mha --gt $(DEMO)/case/reference/*.mha \
		--json $(DEMO)/metrics.json
	@echo
	@echo "mask:       $(DEMO)/output/images/tumor-lymph-node-segmentation/output.mha"
	@echo "QC picture: $(DEMO)/qc.png"
	@echo "report:     $(DEMO)/report.json (ROI of each stage, timings, memory)"
	@echo "reference:  $(DEMO)/case/reference/ (scored above; details in $(DEMO)/metrics.json)"

bench: $(STAMP)
	$(BIN)/python bench/bench_roi_sampling.py
	$(BIN)/python bench/bench_nnunet.py
	$(BIN)/python bench/eval_demo.py
	$(BIN)/python bench/parity_demo_nnunet.py
	$(BIN)/python bench/bench_budget.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache
