"""`kdistill list` as plain, unwrapped lines when piped, and `--help` without type metavars on flags."""

import inspect
import json
import re

import pytest
from typer.testing import CliRunner

import kdistill.data  # noqa: F401  (registers the augmentations)
import kdistill.methods  # noqa: F401
from kdistill.api import list_all
from kdistill.cli import _first_sentence, app
from kdistill.recipes import list_recipes
from kdistill.registry import AUGMENTS, METHODS

runner = CliRunner()  # output goes to a buffer, not a terminal: the piped case


def _entry_lines(output: str) -> dict[str, str]:
    """name -> description for every indented entry line of the listing."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^  (\S+)\s{2,}(.*)$", line) or re.match(r"^  (\S+)$", line)
        assert m, f"not a section header or an entry line (a wrapped description?): {line!r}"
        out[m.group(1)] = m.group(2) if m.lastindex == 2 else ""
    return out


def test_piped_listing_is_one_unwrapped_line_per_entry():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0, r.output
    everything = list_all()
    lines = r.output.splitlines()
    headers = [ln for ln in lines if not ln.startswith(" ")]
    assert headers == [f"{section} ({len(items)})" for section, items in everything.items()]
    assert len(lines) == len(everything) + sum(len(items) for items in everything.values())  # nothing wrapped

    entries = _entry_lines("\n".join(ln for ln in lines if ln.startswith(" ")))
    for section, items in everything.items():
        for name, doc in items.items():
            shown = entries[name]
            assert shown == _first_sentence(doc), (section, name)
            # the whole first sentence is on the line: it ends a sentence or is the whole description
            assert shown == doc or shown.endswith((".", "!", "?")), (name, shown)

    names = set(entries)
    assert set(METHODS.names()) <= names
    assert set(list_recipes()) <= names and len(list_recipes()) > 0
    assert {"mixup", "hard_augment"} <= names
    # one fixed name column for every section
    starts = {len(ln) - len(ln[2:].split(None, 1)[1]) for ln in lines if ln.startswith("  ") and len(ln.split()) > 1}
    assert len(starts) == 1


def test_augmentations_are_listed_from_their_registered_classes():
    d = json.loads(runner.invoke(app, ["list", "--json"]).output)
    assert set(d["augmentations"]) == set(AUGMENTS.names()) >= {"mixup", "hard_augment"}
    for name, doc in d["augmentations"].items():
        summary = inspect.getdoc(AUGMENTS.get(name)).split("\n\n")[0]
        assert doc == " ".join(summary.split()).replace("``", "`") and doc
    assert all(d["recipes"][n] for n in list_recipes()), "every built-in recipe has a description"


@pytest.mark.parametrize("text, first", [
    ("One. Two.", "One."),
    ("Uses e.g. mixup here. Then more.", "Uses e.g. mixup here."),
    ("Zhang et al. (2018) wrote it. More.", "Zhang et al. (2018) wrote it."),
    ("Code `a. B` stays. Next.", "Code `a. B` stays."),
    ("Brackets (one. Two) stay. Next.", "Brackets (one. Two) stay."),
    ("Ratio 4.5x here. Next.", "Ratio 4.5x here."),
    ("no full stop at all", "no full stop at all"),
    ("", ""),
])
def test_first_sentence(text, first):
    assert _first_sentence(text) == first


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["cache", "--help"], ["list", "--help"],
                                  ["eval", "--help"], ["export", "--help"], ["serve", "--help"]])
def test_help_shows_flags_without_a_bool_metavar(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output and "BOOLEAN" not in r.output
    if args[0] == "run":
        assert re.search(r"^\s+--resume\s+Continue", r.output, re.M)
        assert re.search(r"^\s+--no-progress\s+Hide", r.output, re.M)
