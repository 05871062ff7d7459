# Shortcuts; each target runs a script of scripts/, which installs what it needs.
.PHONY: demo test bench bench-quick bench-scale bench-tor

demo:
	./scripts/demo

test:
	./scripts/test

bench:
	./scripts/bench

bench-quick:
	./scripts/bench --quick

bench-scale:
	./scripts/bench --scale

bench-tor:
	./scripts/bench-tor
