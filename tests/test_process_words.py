"""The project speaks of the product: no tracked file says in which sitting or under which run
nickname something was made, or points at the issue tracker. Experiments are named by their date
and commit (docs/experiments.md)."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO

ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
            r"thirteenth|\d+(?:st|nd|rd|th)")
PATTERNS = {
    "a work sitting": re.compile(
        rf"\b(?:{ORDINALS}|this|that|same|next|previous|earlier|later|last|each|every|one|two|three|"
        r"several|many|eight|nine|ten)\s+(?:sessions?|sittings?)\b|\bsessions?'s?\b(?!\s*fixture)|\bsitting\b",
        re.IGNORECASE),
    "a run nickname": re.compile(r"\be8s8", re.IGNORECASE),
    "the issue tracker": re.compile(r"\bissue\s*#?\d+|\bthe issue'?s?\b", re.IGNORECASE),
}
# "session" as a technical term: pytest's fixture scope, onnxruntime's and QGIS's sessions, POSIX's
TECHNICAL = re.compile(r"scope=\"session\"|InferenceSession|SessionOptions|ort_session|new_session|"
                       r"QGIS session|per session|session fixture", re.IGNORECASE)
SKIP_SUFFIXES = (".png", ".jpg", ".tif", ".npz", ".npy", ".pt", ".lock", ".zip")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"git ls-files failed in {REPO}: {e}")
    return [f for f in out.stdout.splitlines()
            if not f.endswith(SKIP_SUFFIXES) and f != "tests/test_process_words.py"]


def test_no_tracked_file_speaks_of_how_it_was_made():
    found = []
    for name in tracked_files():
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            cleaned = TECHNICAL.sub("", line)
            for what, pattern in PATTERNS.items():
                m = pattern.search(cleaned)
                if m:
                    found.append(f"{name}:{number}: {what}: {m.group(0)!r}")
    assert not found, "process words in tracked files:\n" + "\n".join(found[:50])


@pytest.mark.parametrize("line", [
    "(2026-11-26, sixth session)", "the ninth session's models", "same session, scratch scripts",
    "run e8s8_weakbc", "issue 6 quotes ~0.41", "the issue's 7.3 / 26", "in the last sitting",
])
def test_the_check_catches_process_words(line):
    assert any(p.search(TECHNICAL.sub("", line)) for p in PATTERNS.values())


@pytest.mark.parametrize("line", [
    '@pytest.fixture(scope="session")', "ort.InferenceSession(path)", "start_new_session=True",
    "one QGIS session", "built once per session", "the segmentation of 2026-11-26 (commit cd61791)",
])
def test_the_check_leaves_technical_words(line):
    assert not any(p.search(TECHNICAL.sub("", line)) for p in PATTERNS.values())
