PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean
DEMO := demo-out

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/hnseg phantom --seed 1 --fov whole-body --out $(DEMO)/case
	$(BIN)/python process.py --input $(DEMO)/case/input --output $(DEMO)/output --weights weights/suv-threshold --report $(DEMO)/report.json --device cpu
	@echo
	@echo "mask:      $(DEMO)/output/images/tumor-lymph-node-segmentation/output.mha"
	@echo "report:    $(DEMO)/report.json"
	@echo "reference: $(DEMO)/case/reference/"
	@echo "weights/suv-threshold is a non-learned SUV > 2.5 baseline standing in for trained demo weights;"
	@echo "it outlines every hot region (brain included) as GTVp. QC pictures are not implemented yet."

bench: $(STAMP)
	$(BIN)/python bench/bench_roi_sampling.py
	$(BIN)/python bench/bench_nnunet.py

clean:
	rm -rf $(VENV) .pytest_cache
