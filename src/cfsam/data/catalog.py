"""The data sets' registry (``registry/datasets.yaml``: data, not code), its errors, and the record filters its
templates use. The mirror (``sources``) and the Hub (``hub``) both read it, so neither imports the other's
registry through the other.
"""
from __future__ import annotations

from cfsam.core import registry as registry_
from cfsam.core.registry import RegistryError


class DataError(RegistryError):
    """Unknown dataset, missing file, or a malformed record."""


class DataUnavailable(DataError):
    """A set that cannot be had here by design: the mirror lacks it (as the registry and the mirror's
    MANIFEST.md say), it has no Hub copy, or the Hub cannot be reached. Only this makes an eval task 'missing'."""


class DamagedFile(DataError):
    """A mirror file that is there but cannot be read as its set: truncated, malformed, not a plain file, or
    not the size MANIFEST.md lists. Always an error naming the file, never a 'missing' set."""


def registry() -> dict[str, dict]:
    return registry_.entries("datasets")


def dataset_names(kind: str | None = None) -> list[str]:
    return [n for n, s in registry().items() if kind is None or s["kind"] == kind]


def dataset_spec(name: str) -> dict:
    if name not in registry():
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(registry())}")
    return registry()[name]


def llamacpp_clean(text: str) -> str:
    """llama.cpp's HellaSwag export cleaning (klosax/hellaswag_text_data, extract_hellaswag.cpp).

    Its replacements, in its order, each one left-to-right pass as str.replace; then one leading and one
    trailing space go (the C++ trailing erase is erase(end()), undefined: its evident intent is kept)."""
    for old, new in (("[header]", ""), ("[step]", ""), ("[substeps]", ""), (" [title]", ". "), ("[title] ", ""),
                     ("[title].", ""), ("  ", " ")):
        text = text.replace(old, new)
    text = text[1:] if text.startswith(" ") else text
    return text[:-1] if text.endswith(" ") else text
