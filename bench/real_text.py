"""A real-English 6-class text task that needs no download: the first paragraph of each docstring in Python's
standard library, labelled by the domain of the module it documents.

Docstrings are text people wrote to be read, with the vocabulary and the sentence lengths of technical English,
and telling "networking" from "concurrency" from their words is a task a pretrained encoder knows something
about before fine-tuning, and a random one does not. Used by the benchmarks that make accuracy claims about
real pretrained weights (``finetune_defaults.py``).

    .venv/bin/python bench/real_text.py OUT.csv [--per-class 300]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import random
import re
from pathlib import Path

DOMAINS = {
    "networking": ("http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse", "socket",
                   "smtplib", "ftplib", "imaplib", "poplib", "ssl", "socketserver", "xmlrpc.client", "ipaddress"),
    "concurrency": ("asyncio", "asyncio.tasks", "asyncio.events", "asyncio.streams", "asyncio.locks", "threading",
                    "multiprocessing", "multiprocessing.pool", "concurrent.futures", "queue", "sched", "selectors"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext", "html.parser",
             "shlex", "stringprep", "fnmatch"),
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "operator", "bisect",
                "heapq"),
    "files": ("os", "os.path", "pathlib", "shutil", "tempfile", "glob", "io", "filecmp", "zipfile", "tarfile",
              "gzip", "stat"),
    "data formats": ("json", "csv", "pickle", "xml.etree.ElementTree", "xml.dom.minidom", "sqlite3", "configparser",
                     "plistlib", "base64", "binascii", "struct", "email.message"),
}


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    found = [inspect.getdoc(module)]
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        found.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            found += [inspect.getdoc(m) for _, m in inspect.getmembers(obj, inspect.isfunction)
                      if m.__module__ == module.__name__]
    return [d for d in found if d]


def _paragraph(doc: str) -> str | None:
    """The docstring's first paragraph on one line, if it reads as prose (4 to 80 words, no signature)."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    words = text.split()
    if not 4 <= len(words) <= 80 or re.match(r"^\w+\(.*\)", text) or text.count(">>>"):
        return None
    return text


def rows(per_class: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """``(text, domain)`` rows, at most ``per_class`` per domain, deduplicated, shuffled with ``seed``."""
    rng = random.Random(seed)
    seen, out = set(), []
    for domain, modules in DOMAINS.items():
        texts = []
        for name in modules:
            for doc in _docstrings(name):
                para = _paragraph(doc)
                if para and para not in seen:
                    seen.add(para)
                    texts.append(para)
        rng.shuffle(texts)
        out += [(t, domain) for t in texts[:per_class]]
    rng.shuffle(out)
    return out


def write_csv(path: Path, per_class: int = 300, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows(per_class, seed))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=300)
    args = parser.parse_args()
    written = rows(args.per_class)
    write_csv(Path(args.out), args.per_class)
    counts = {d: sum(1 for _, label in written if label == d) for d in DOMAINS}
    print(f"{len(written)} rows to {args.out}: {counts}")
