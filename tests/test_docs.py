"""Links into the docs resolve: code and docs cite ``docs/<page>.md#<heading>``."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# docs/method.md#the-operator, (method.md#the-operator), (#the-operator)
_REF = re.compile(r"(?:docs/)?([\w-]+\.md)?#([a-z0-9][\w-]*)")
_LINK = re.compile(r"\]\(([\w./-]*?)(?:#([\w-]+))?\)")


def anchors(path):
  """GitHub's heading anchors of a Markdown file (code blocks skipped)."""
  out, seen, in_code = set(), {}, False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("```"):
        in_code = not in_code
        continue
      m = re.match(r"^#+\s+(.*)", line)
      if in_code or not m:
        continue
      slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
      if slug in seen:
        seen[slug] += 1
        slug = f"{slug}-{seen[slug]}"
      else:
        seen[slug] = 0
      out.add(slug)
  return out


def _source_files():
  for top in ("brnpa_jax", "configs", "benchmarks", "docs", "tests"):
    for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
      for name in names:
        if name.endswith((".py", ".md")):
          yield os.path.join(dirpath, name)
  yield os.path.join(ROOT, "README.md")


def test_anchor_slugs():
  got = anchors(os.path.join(DOCS, "method.md"))
  assert {"the-operator", "degenerate-inputs", "release-protocol",
          "gap-the-plain-cnn"} <= got
  assert "gap: the plain cnn" not in got


def _target(path, page):
  """The file a reference in ``path`` to ``page`` points at."""
  if not page:
    return path
  if path.endswith(".md"):  # Markdown links are relative to their file
    return os.path.normpath(os.path.join(os.path.dirname(path), page))
  for base in (DOCS, ROOT):  # code cites docs/<page>.md or <page>.md
    candidate = os.path.join(base, page)
    if os.path.exists(candidate):
      return candidate
  return os.path.join(DOCS, page)


def test_cited_doc_headings_exist():
  cache, broken = {}, []
  for path in _source_files():
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if path.endswith(".md"):
      refs = [(page, frag) for page, frag in _LINK.findall(text)
              if page.endswith(".md") or (not page and frag)]
    else:
      refs = [(page, frag) for page, frag in _REF.findall(text) if page]
    for page, frag in refs:
      target = _target(path, page)
      where = os.path.relpath(path, ROOT)
      if not os.path.exists(target):
        broken.append(f"{where}: {page} does not exist")
      elif frag:
        if target not in cache:
          cache[target] = anchors(target)
        if frag not in cache[target]:
          broken.append(f"{where}: {page}#{frag}: no such heading")
  assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", ["method.md", "differences.md"])
def test_pages_exist(page):
  assert os.path.exists(os.path.join(DOCS, page))
