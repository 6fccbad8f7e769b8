"""Counts in console lines and stage summaries: "1 image", "2 images", never "1 images"."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """`n` and `noun`, the noun in the plural unless n is 1 ("1 crop", "0 crops", "3 patches"); `many` overrides
    the plural form. A multi-word noun has its last word inflected ("1 val crop", "2 val crops")."""
    if n == 1:
        return f"{n} {noun}"
    if many is None:
        head, _, last = noun.rpartition(" ")
        last += "es" if last.endswith(("s", "x", "ch", "sh")) else "s"  # pass -> passes, patch -> patches
        many = f"{head} {last}" if head else last
    return f"{n} {many}"
