# Shortcuts for the commands in README.md.
.PHONY: setup demo test lab export clean-nbs bench
setup:      ; bash scripts/setup.sh
demo:       ; bash scripts/demo.sh
test:       ; bash scripts/test.sh
lab: setup  ; . .venv/bin/activate && jupyter lab nbs/
export:     ; . .venv/bin/activate && nbdev-export && nbdev-clean
bench:      ; . .venv/bin/activate && python bench/train_throughput.py
