"""Fuzzed readers (issue 22): a store's attributes, final.json, bundle.json and dataset.json, edited at
random, are read or refused with one `Error:` line by every command that reads them, never a traceback
or NaN metrics.

The properties and the tiny pipeline run they start from live in bench/fuzz.py, which `python -m
bench.fuzz` runs with as many cases as asked; here a few cases per reader, drawn from hypothesis'
fixed seeds, so `make test` is bounded and gives the same cases every run.
"""
from __future__ import annotations

import logging

import pytest

from bench import fuzz

# Sized by cost per case on our 2-core machine: a store case runs seven commands (two train an adapter),
# a dataset case three that stop right after reading it. About 20 s for all four (most cases are refused
# at once; a case whose edits a reader accepts runs every command to the end).
EXAMPLES = {"store": 60, "checkpoint": 60, "bundle": 100, "dataset": 100}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return fuzz.build(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture
def quiet():
    """The stages warn about tiny runs once per case; the cases judge the commands' output, not the log."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_the_unedited_fixtures_pass_every_reader(fixtures, quiet, reader):
    """Each command works on the valid files, or (dataset) fails on the option meant to stop it only after
    dataset.json was read: so the cases below test the readers, not an option check before them."""
    assert fuzz.unedited(reader, fixtures) == []


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_an_edited_file_is_read_or_refused_in_one_line(fixtures, quiet, reader):
    tally = fuzz.fuzz(reader, fixtures, EXAMPLES[reader])  # raises at the first failing case, naming its edits
    assert tally.cases == EXAMPLES[reader]
