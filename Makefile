# The README's two commands are `make demo` and `make test`; both install first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install install-gpu demo test
install:
	scripts/install.sh

install-gpu:
	scripts/install.sh --gpu

demo: install
	mim pipeline --out runs/demo

test: install
	python -m pytest -q
