"""README.md and docs/*.md: relative links resolve, tables equal their JSON, the README stays a
front page.

Links are read with a regular expression (inline `[text](target)` and images, outside code);
anchors are checked against GitHub's heading slugs of the target file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import doc_tables

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
  """The text without fenced code blocks, indented code blocks and inline code."""
  text = FENCE.sub("", text)
  text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
  return INLINE_CODE.sub("", text)


def _slugs(path: Path) -> set[str]:
  """GitHub's anchors of a markdown file's headings (lowercase, punctuation dropped, spaces to
  hyphens, repeats numbered)."""
  seen: dict[str, int] = {}
  out = set()
  for line in FENCE.sub("", path.read_text()).splitlines():
    m = re.match(r"#{1,6}\s+(.*)", line)
    if not m:
      continue
    slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
    out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return out


def _links(path: Path) -> list[str]:
  return LINK.findall(_prose(path.read_text()))


def test_link_parser_sees_links_and_skips_code():
  text = ("See [a](docs/a.md#x) and ![b](figures/b.png).\n\n    [c](indented.md)\n"
          "```\n[d](fenced.md)\n```\n`[e](inline.md)` [f](https://example.com)\n")
  assert LINK.findall(_prose(text)) == ["docs/a.md#x", "figures/b.png", "https://example.com"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  broken = []
  for target in _links(path):
    if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked (no network)
      continue
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(f"{target}: {resolved} does not exist")
    elif anchor and resolved.suffix == ".md" and anchor not in _slugs(resolved):
      broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
  assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_equal_their_json(path):
  text = path.read_text()
  assert doc_tables.regenerate(text) == text, (
      f"{path.relative_to(ROOT)}: a table differs from its JSON; "
      "run python -m benchmarks.doc_tables")


def test_readme_reports_the_default_job_json():
  """The headline figures as the job wrote them, formatted here, not by the generator."""
  report = json.loads((ROOT / "docs" / "results" / "world_default.json").read_text())
  readme = (ROOT / "README.md").read_text()
  for model in ("rag_sequence", "rag_token", "closed_book"):
    assert f"**{report[model]['heldout_em']:.3f}**" in readme, model
  swap = report["rag_sequence"]["hot_swap"]
  assert f"{swap['follow_new_index']} / {swap['changed']}" in readme
  assert report["command"] in readme and report["commit"] in readme


def test_readme_is_a_front_page_with_ci_test_command():
  readme = (ROOT / "README.md").read_bytes()
  assert len(readme) <= 8192, f"README.md is {len(readme)} bytes; the front page keeps to 8 KB"
  command = "pip install -r requirements-test.txt && python -m pytest"
  assert f"    {command}\n" in readme.decode()
  assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command


def test_world_paper_table_reports_every_rows_em_as_the_job_wrote_it():
  """Each world's held-out EM per row (report.json's floats, formatted here) in docs/world.md's
  Table 6 line of that row, in world order."""
  report = json.loads((ROOT / "docs" / "results" / "world_paper.json").read_text())
  text = (ROOT / "docs" / "world.md").read_text()
  lines = text[text.index("<!-- begin world_paper.table6"):].splitlines()
  for key, row in report["worlds"]["default"]["evaluation"]["rows"].items():
    table6 = next(line for line in lines if line.startswith(f"| {row['row']} | "))
    cells = [c.strip() for c in table6.strip("|").split("|")]
    ems = [f"{100 * w['evaluation']['rows'][key]['scores']['em']:.1f}"
           for w in report["worlds"].values()]
    assert cells[1::2][:len(ems)] == ems, (row["row"], cells)


def test_every_results_json_is_shown_in_the_docs():
  shown = "".join(p.read_text() for p in MARKDOWN)
  feeds = {"world_hard_no_eda": "world_hard"}  # Its "without EDA" column.
  for path in sorted((ROOT / "docs" / "results").glob("*.json")):
    table = feeds.get(path.stem, path.stem)
    assert f"<!-- begin {table}" in shown, f"{path.name} feeds no table"


def test_refresh_plan_counts_the_context_encoder_as_transformers_builds_it():
  """The refresh plan's parameter count (memory of the trained context encoder) is the number of
  parameters of transformers' DPRContextEncoder of the same shape."""
  transformers = pytest.importorskip("transformers")
  shape = {"vocab_size": 99, "hidden_size": 16, "num_hidden_layers": 3,
           "num_attention_heads": 2, "intermediate_size": 37, "max_position_embeddings": 24}
  torch_model = transformers.DPRContextEncoder(transformers.DPRConfig(**shape))
  assert doc_tables.bert_parameters(shape) == sum(p.numel() for p in torch_model.parameters())
