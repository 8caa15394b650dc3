"""Where saved directions come from: a directions file (HeadDirections.source) and a profile's
universal entry (universal_source) name one of these, as `vectors build --from` builds them.

A leaf of plain strings: profiles read it without loading the GGUF reader.
"""

from __future__ import annotations

TR_PREFIXES = "tr-prefixes"              # TR's fixed prefixes: the delta of P- minus P+ at the prompt's end
FGDILP_INSTANCES = "fgdilp-instances"    # FGDILP's instance prefixes (self-generation, diagnosis), fused
LABELLED_TEXT = "labelled-text"          # toxic minus clean labelled texts at TR's strength (docs/method.md §7.6)
SOURCES = (TR_PREFIXES, FGDILP_INSTANCES, LABELLED_TEXT)

# `vectors build --from` took these short words before it took the sources' names (still read)
SHORT_NAMES = {"tr": TR_PREFIXES, "fgdilp": FGDILP_INSTANCES, "data": LABELLED_TEXT}

# what files written before `source` existed hold in fgdilp.method (and profiles in universal_source)
_LEGACY = {"fgdilp-frozen": FGDILP_INSTANCES, "universal-tr": TR_PREFIXES, "universal-fgdilp": FGDILP_INSTANCES,
           "universal-data": LABELLED_TEXT, "tr": TR_PREFIXES}


def from_legacy(value: str) -> str:
    """The source of a file's former fgdilp.method value ("universal-data" -> "labelled-text"); a
    control's suffix stays ("fgdilp-frozen+random" -> "fgdilp-instances+random"), and a value that
    names no known source is kept as it is (it is only shown)."""
    base, plus, rest = value.partition("+")
    return _LEGACY.get(base, base) + plus + rest


def source_named(word: str) -> str:
    """A source from a source name or its short word (tr, fgdilp, data)."""
    return SHORT_NAMES.get(word, word)
