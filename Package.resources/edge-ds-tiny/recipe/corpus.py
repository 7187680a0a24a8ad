"""The training corpus: the King James Version of the Bible (public domain), from Debian.

Source: Debian's `bible-kjv-text` package (data) and `bible-kjv` (the `bible` program that
decompresses it), version 4.38. `python corpus.py --from-debian` rebuilds data/kjv.txt.xz from
them (needs apt-get and network, once); everything else reads the committed xz file.

Format of the raw dump: one verse per line, "Ge1:1 In the beginning God created ...".
We keep the text, drop the references, and group verses into chapters (a chapter is one
training document). Every 48th chapter (index % 48 == 24) is held out for validation: 25 of
1189 chapters, 2.3% of the text, whole chapters so no verse leaks from its neighbours.
"""

from __future__ import annotations

import argparse
import lzma
import re
import subprocess
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
RAW = DATA / "kjv.txt.xz"
VALIDATION = DATA / "validation.txt"
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def from_debian(out: Path = RAW) -> None:
    """Download the two Debian packages, dump every verse with `bible`, write the xz file."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], cwd=tmp, check=True)
        for deb in tmp.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        text = subprocess.run(
            [str(tmp / "x/usr/bin/bible"), "-f", "-p", str(tmp / "x/usr/lib"), "Gen1:1-Rev22:21"],
            check=True, capture_output=True, text=True,
        ).stdout
    out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9))


def chapters() -> list[list[str]]:
    """Every chapter in order, as a list of verse texts."""
    out: list[list[str]] = []
    current = None
    for line in lzma.decompress(RAW.read_bytes()).decode("utf-8").splitlines():
        m = _VERSE.match(line)
        if m is None:
            raise ValueError(f"{RAW}: unexpected line {line[:60]!r}")
        key = (m.group(1), m.group(2))
        if key != current:
            out.append([])
            current = key
        out[-1].append(m.group(4).strip())
    return out


def is_validation(index: int) -> bool:
    return index % 48 == 24


def split() -> tuple[list[list[str]], list[list[str]]]:
    """(train chapters, validation chapters)."""
    every = chapters()
    train = [c for i, c in enumerate(every) if not is_validation(i)]
    valid = [c for i, c in enumerate(every) if is_validation(i)]
    return train, valid


def write_validation() -> None:
    """data/validation.txt: the held-out chapters, one verse per line, a blank line between chapters."""
    _, valid = split()
    VALIDATION.write_text("\n\n".join("\n".join(c) for c in valid) + "\n", encoding="utf-8")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-debian", action="store_true", help="rebuild data/kjv.txt.xz from Debian's packages")
    args = ap.parse_args()
    if args.from_debian:
        from_debian()
    write_validation()
    train, valid = split()
    n_train = sum(len(v) + 1 for c in train for v in c)
    n_valid = sum(len(v) + 1 for c in valid for v in c)
    print(f"train: {len(train)} chapters, {n_train} chars; validation: {len(valid)} chapters, "
          f"{n_valid} chars ({100 * n_valid / (n_train + n_valid):.1f}%)")
