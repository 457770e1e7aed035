"""The planner's per-directory name screen may over-select, but never misses a name a keep rule keeps."""

from __future__ import annotations

import random

import pytest
from mlwarden.jobs.cleanup.rules import NameScreen, Protection, is_best, is_checkpoint

# Fragments that make names near the rules' boundaries: prefixes, suffixes, 'best' in odd cases.
FRAGMENTS = [
    "step_", "step-", "step", "ckpt_", "ckpt-", "ckpt", "checkpoint-", "checkpoint.", "checkpoints", "global_step",
    ".pt", ".pth", ".ckpt", ".safetensors", ".pt.tmp", "BEST", "bEsT", "be", "st", "ſt", "final", ".yaml", "x", "0", "/",
]
GLOB_SETS = [(), ("*.yaml",), ("final*",), ("*eval*", "model_?.bin"), ("run-*/eval/*",)]


def random_name(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 4))).replace("/", "_") or "x"


def kept_by_a_rule(name: str, protection: Protection) -> bool:
    return is_best(name) or is_checkpoint(name) or protection.matches(name, name)


@pytest.mark.parametrize("globs", GLOB_SETS)
def test_the_screen_never_misses_a_kept_name(globs: tuple[str, ...]) -> None:
    rng = random.Random(1234)
    protection = Protection(globs)
    screen = NameScreen(protection)
    checked = 0
    for _ in range(400):
        names = list(dict.fromkeys(random_name(rng) for _ in range(rng.randint(1, 30))))
        notable = screen.notable(names)
        for name in names:
            if kept_by_a_rule(name, protection):
                checked += 1
                assert name in notable, f"{name!r} is kept by a rule but the screen passed over it"
    assert checked > 100  # the generator does reach the rules


def test_a_directory_of_plain_names_needs_no_closer_look() -> None:
    screen = NameScreen(Protection(("*.yaml",)))
    assert not screen.notable(["events.out.tfevents.1", "log.txt", "metrics.jsonl"])
    assert screen.notable(["log.txt", "Model_Best.bin", "config.yaml"]) >= {"Model_Best.bin", "config.yaml"}
