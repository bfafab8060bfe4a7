# Shortcuts for the commands in README.md.
.PHONY: setup demo test lab export clean-nbs bench slides slides-figures student
setup:      ; bash scripts/setup.sh
demo:       ; bash scripts/demo.sh
test:       ; bash scripts/test.sh
lab: setup  ; . .venv/bin/activate && jupyter lab nbs/
export:     ; . .venv/bin/activate && nbdev-export && nbdev-clean
bench:      ; . .venv/bin/activate && python bench/train_throughput.py
slides:        ; . .venv/bin/activate && ssl-course slides            # decks into slides/build/ (figures from build/executed/ when current)
slides-figures: ; . .venv/bin/activate && ssl-course slides --execute  # run every chapter first (about 8 min on 2 CPU cores)
student:       ; . .venv/bin/activate && ssl-course student           # regenerate student/ after editing nbs/
