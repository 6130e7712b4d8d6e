# MedJEPA: the two commands of the README.
#   make demo   set up, generate the demo data, pretrain (2 CPU cores: 5-10 min with bf16, 15-33 without), evaluate with the
#               random-init, raw-pixel and supervised rows, print the tables
#   make test   set up and run the test suite (2 CPU cores: about 7 min with bf16, 11-15 min on AVX2-only EPYCs);
#               pytest and hypothesis are test-only
# A torch that is already installed (e.g. your CUDA build) is kept if it is at least 2.10 (older ones load
# crafted checkpoints unsafely, docs/reliability.md); otherwise torch==2.13.0 is installed, never an unpinned
# torch. Use another interpreter with `make demo PYTHON=/path/to/python`.
PYTHON ?= python3

.PHONY: install demo test
install:
	@$(PYTHON) -c "import re, sys, torch; sys.exit(tuple(map(int, re.match(r'(\d+)\.(\d+)', torch.__version__).groups())) < (2, 10))" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	@$(PYTHON) -m pip install -q -r requirements.txt

demo: install
	$(PYTHON) prepare.py demo
	$(PYTHON) medjepa.py config/demo_views.py
	$(PYTHON) eval.py --ckpt=out-demo-views/ckpt.pt

test: install
	@$(PYTHON) -m pip install -q pytest hypothesis
	$(PYTHON) -m pytest
