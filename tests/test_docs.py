"""Links into the docs resolve (code and docs cite ``docs/<page>.md#<heading>``),
and the method page names the operator's differentiation rule."""

import os
import re

import jax

from brnpa_jax.attention import brnpa as brnpa_module

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
  """The two pages every other one links to, and GitHub's slugs of them."""
  got = anchors(os.path.join(DOCS, "method.md"))
  assert {"the-operator", "degenerate-inputs", "release-protocol",
          "gap-the-plain-cnn"} <= got
  assert "gap: the plain cnn" not in got
  assert "the-operator" in anchors(os.path.join(DOCS, "differences.md"))


def _section(path, heading):
  """The text under a Markdown heading, up to the next heading."""
  text = open(path, encoding="utf-8").read()
  start = re.search(rf"^#+ {re.escape(heading)}\n", text, re.M)
  assert start, f"{path}: no heading {heading!r}"
  end = re.search(r"^#+ ", text[start.end():], re.M)
  return text[start.end():start.end() + end.start() if end else None]


def test_method_docs_name_the_operators_differentiation_rule():
  """docs/method.md#gradients names the rule the operator's core is
  decorated with (read from the code), and its function, not the other."""
  rule = brnpa_module._brnpa_flat
  if isinstance(rule, jax.custom_jvp):
    kind, other, fn, mode = "custom JVP", "custom VJP", rule.jvp, "forward mode"
  else:
    assert isinstance(rule, jax.custom_vjp), type(rule)
    kind, other, fn, mode = "custom VJP", "custom JVP", rule.bwd, "reverse mode"
  text = " ".join(_section(os.path.join(DOCS, "method.md"), "Gradients").split())
  assert kind in text and f"`{fn.__name__}`" in text and mode in text, text
  assert other not in text, text


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
