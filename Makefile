# The two commands of the README. Each sets up what it needs first (scripts/bootstrap.sh).
.PHONY: demo test bootstrap docs bench

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/mlwarden demo $(ARGS)

test: bootstrap
	.venv/bin/python -m pytest $(ARGS)

# Regenerate the configuration tables in README.md and docs/ from the settings classes.
docs: bootstrap
	.venv/bin/python -m mlwarden.docgen

# Run every benchmark and rewrite docs/benchmarks.md (slow; by hand, never in CI).
bench: bootstrap
	.venv/bin/python -m bench.run_all $(ARGS)
