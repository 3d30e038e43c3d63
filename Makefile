# Two environments: mace-torch 0.3.16 pins e3nn==0.4.4, nequip 0.19 needs e3nn>=0.6.
# torch is pinned (a local CPU wheel here); override with e.g. `make test TORCH_SPEC="torch==2.5.1"`.
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
MACE_VENV   ?= .venv-mace
NEQUIP_VENV ?= .venv-nequip
PYTEST_ARGS ?=
BENCH_PROFILE ?= quick
BENCH_DATA  ?= ../shared/data
BENCH_OUT   ?= bench_out
BENCH_ARGS  ?=
COMMA := ,

.PHONY: test test-mace test-nequip demo bench envs clean-envs

envs: $(MACE_VENV)/.e2ip-installed $(NEQUIP_VENV)/.e2ip-installed

# pip's output goes to <venv>/install.log (printed if the install fails)
define make_venv
	@echo "building $(1) (e2ip[$(2)], $(TORCH_SPEC)); log: $(1)/install.log"
	@$(PYTHON) -m venv $(1)
	@( $(1)/bin/python -m pip install -q --upgrade pip \
	   && $(1)/bin/python -m pip install -q "$(TORCH_SPEC)" \
	   && $(1)/bin/python -m pip install -q -e ".[$(2)]" "$(TORCH_SPEC)" ) > $(1)/install.log 2>&1 \
	   || { tail -n 40 $(1)/install.log; echo "pip install into $(1) failed: see $(1)/install.log"; exit 1; }
	@touch $(1)/.e2ip-installed
endef

$(MACE_VENV)/.e2ip-installed: pyproject.toml
	$(call make_venv,$(MACE_VENV),mace$(COMMA)wandb$(COMMA)dev$(COMMA)xtb)

$(NEQUIP_VENV)/.e2ip-installed: pyproject.toml
	$(call make_venv,$(NEQUIP_VENV),nequip$(COMMA)wandb$(COMMA)dev$(COMMA)xtb)

# one thread per suite: the two suites run side by side on the machine's cores
SUITE_ENV = WANDB_MODE=offline OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test-mace: $(MACE_VENV)/.e2ip-installed
	$(SUITE_ENV) $(MACE_VENV)/bin/python -m pytest tests/core tests/mace $(PYTEST_ARGS)

test-nequip: $(NEQUIP_VENV)/.e2ip-installed
	$(SUITE_ENV) $(NEQUIP_VENV)/bin/python -m pytest tests/core tests/nequip $(PYTEST_ARGS)

# both environments built, then both suites at once; each suite's output is printed whole when it ends
test:
	@$(MAKE) --no-print-directory -j2 envs
	@echo "running tests/core+tests/mace (.venv-mace) and tests/core+tests/nequip (.venv-nequip) side by side ..."
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-mace test-nequip

# the real job: nequip-train (configs/nequip/e2ip.yaml) on the shipped iso7 data, then the UQ table
# (ID / OOD molecules / OOD 1200 K, raw and recalibrated on val) and plots in demo_out/
demo: $(NEQUIP_VENV)/.e2ip-installed
	WANDB_MODE=offline $(NEQUIP_VENV)/bin/python -m nequip_ext.demo --out demo_out

# Benchmark (benchmarks/run.py): plain vs e2ip vs eip vs 4-member ensemble on both backbones, each in its
# own environment side by side; report in $(BENCH_OUT)/report.md. `make bench BENCH_PROFILE=full` on a GPU.
bench: $(MACE_VENV)/.e2ip-installed $(NEQUIP_VENV)/.e2ip-installed
	$(NEQUIP_VENV)/bin/python -m benchmarks.run --backbone both --profile $(BENCH_PROFILE) \
		--data-dir $(BENCH_DATA) --out $(BENCH_OUT) \
		--mace-python $(MACE_VENV)/bin/python --nequip-python $(NEQUIP_VENV)/bin/python $(BENCH_ARGS)

clean-envs:
	rm -rf $(MACE_VENV) $(NEQUIP_VENV)
