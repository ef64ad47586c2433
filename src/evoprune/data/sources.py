"""Named text sources, resolved from a local data dir first, then the HF hub.

Owns ``get_text(name, role)``. ``role`` is ``"calib"`` or ``"eval"``; the two
never overlap for the named sources:

=============  =====================================  ==================================
source         calib                                  eval
=============  =====================================  ==================================
wikitext2      ``wiki.valid.raw`` (validation split)   ``wiki.test.raw`` (test split)
c4             documents 1000–1999 of the sample       documents 0–999 of the sample
text:PATH      the whole file                          the whole file (user's choice)
jsonl:PATH[:f] field ``f`` (default ``text``) of every line, both roles
=============  =====================================  ==================================

Local data dir: ``$EVOPRUNE_DATA``, else ``../shared/data`` beside the repository
(or beside the current directory). Files: ``wikitext-2-raw/wiki.{valid,test}.raw``
and ``c4/c4_validation_2k.json.gz`` (2,000 C4 ``en`` validation documents). When
no local copy exists the hub is used (``wikitext``/``wikitext-2-raw-v1``;
``allenai/c4`` ``en`` validation, first 2,000 documents, same split).

Documents are joined with ``"\\n\\n"`` (the standard perplexity protocol). For
WikiText the rows are the raw file's lines, as the hub dataset yields them, so
the local and the hub text are the same string.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from ..errors import UserError

__all__ = ["get_text", "get_documents", "check_source", "data_dir", "SOURCES"]

SOURCES = ("wikitext2", "c4", "text:PATH", "jsonl:PATH[:field]")
_C4_FILE = "c4/c4_validation_2k.json.gz"
_C4_SPLIT = {"eval": (0, 1000), "calib": (1000, 2000)}
_WIKI_FILE = {"calib": "wikitext-2-raw/wiki.valid.raw", "eval": "wikitext-2-raw/wiki.test.raw"}


def data_dir() -> Path | None:
    """The local data directory, or ``None`` when there is none."""
    env = os.environ.get("EVOPRUNE_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _check_role(role: str) -> None:
    if role not in ("calib", "eval"):
        raise ValueError(f"role must be 'calib' or 'eval', got {role!r}")


def _wikitext_rows(role: str) -> list[str]:
    d = data_dir()
    if d is not None and (d / _WIKI_FILE[role]).is_file():
        with open(d / _WIKI_FILE[role], encoding="utf-8") as f:
            # the hub builder yields each line (newline kept) and "" for blank lines
            return [line if line.strip() else "" for line in f]
    split = "validation" if role == "calib" else "test"
    return list(_hub("wikitext", "wikitext-2-raw-v1", split, f"{_WIKI_FILE[role]} under {d or '$EVOPRUNE_DATA'}")["text"])


def _c4_docs(role: str) -> list[str]:
    lo, hi = _C4_SPLIT[role]
    d = data_dir()
    if d is not None and (d / _C4_FILE).is_file():
        with gzip.open(d / _C4_FILE, "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        return docs[lo:hi]
    ds = _hub("allenai/c4", "en", f"validation[:{hi}]", f"{_C4_FILE} under {d or '$EVOPRUNE_DATA'}",
              data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
    return list(ds["text"])[lo:hi]


def _hub(path: str, name: str, split: str, local_desc: str, **kw):
    try:
        from datasets import load_dataset

        return load_dataset(path, name, split=split, **kw)
    except Exception as e:
        raise UserError(
            f"data source not found: no local {local_desc} and the hub ({path}) is unreachable ({type(e).__name__})"
        ) from None


def _file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file not found: {path}")
    return p


def _jsonl_path(rest: str) -> tuple[str, str]:
    """``PATH[:field]`` -> ``(PATH, field)``; a path that itself holds a colon wins when it exists."""
    if ":" in rest and not Path(rest).expanduser().is_file():
        path, field = rest.rsplit(":", 1)
        return path, field or "text"
    return rest, "text"


def check_source(name: str, *, files: bool = True, what: str = "data source") -> None:
    """Refuse, without reading it, a source ``name`` that :func:`get_documents` would refuse: an unknown kind, an
    empty path, and (``files``) a ``text:``/``jsonl:`` file that does not exist or is a directory."""
    name = str(name)
    if name in ("wikitext2", "c4"):
        return
    for prefix in ("text:", "jsonl:"):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            path = _jsonl_path(rest)[0] if prefix == "jsonl:" else rest
            if not path.strip():
                raise UserError(f"{what} {name!r} names no file (e.g. {prefix}corpus.txt)")
            p = Path(path).expanduser()
            if files and p.is_dir():
                raise UserError(f"{what} {name!r}: {path} is a directory; a file was expected")
            if files and not p.is_file():
                raise UserError(f"{what} {name}: data file not found: {path}")
            return
    raise UserError(f"unknown data source {name!r} for {what} (choose from {', '.join(SOURCES)})")


def get_documents(name: str, role: str = "eval") -> list[str]:
    """The documents of source ``name`` for ``role`` (see the module table)."""
    _check_role(role)
    if name == "wikitext2":
        return _wikitext_rows(role)
    if name == "c4":
        return _c4_docs(role)
    if name.startswith("text:"):
        return [_file(name[5:]).read_text(encoding="utf-8")]
    if name.startswith("jsonl:"):
        rest, field = _jsonl_path(name[6:])
        docs = []
        with open(_file(rest), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)[field]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{rest}:{n}: not a JSON object with field {field!r}") from None
        return docs
    raise UserError(f"unknown data source {name!r} (choose from {', '.join(SOURCES)})")


def get_text(name: str, role: str = "eval") -> str:
    """The text of source ``name`` for ``role``: documents joined with ``"\\n\\n"``.

    Raises :class:`UserError` when the source is unknown, missing or empty.
    """
    text = "\n\n".join(get_documents(name, role))
    if not text.strip():
        raise UserError(f"data source {name!r} ({role}) is empty")
    return text
