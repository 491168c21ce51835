"""benchmark.py at the tiny preset: every workload runs for rag_jax and its peer and the JSON
holds every field the docs are generated from (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli, flops, presets, profile, train_step
from benchmarks import report as report_md
from benchmarks.retrieval import faiss_at_recall

ROOT = Path(__file__).resolve().parent.parent


def _user_env() -> dict[str, str]:
  """One CPU device and no compilation cache, as a user runs it (compile_s is a compile)."""
  return {k: v for k, v in os.environ.items()
          if k != "XLA_FLAGS" and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
  workdir = tmp_path_factory.mktemp("bench")
  env = _user_env()
  proc = subprocess.run(
      [sys.executable, "benchmark.py", "--preset=tiny", "--repeats=2", "--warmup=1",
       "--profile=1", "--rescore=auto:auto,all:3", "--scann=2:0.03,recall=0.9",
       f"--workdir={workdir}"], cwd=ROOT,
      capture_output=True, text=True,
      timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rag_jax/s" in proc.stdout  # the console table
  return json.loads((workdir / "tiny.json").read_text())


def test_json_has_every_field(report):
  assert report["errors"] == []
  assert {"jax", "flax", "transformers", "torch", "devices", "host"} <= set(report["machine"])
  assert report["machine"]["compilation_cache"] == ""  # none: compile_s is a compile
  # The commit measured, as git names it (before: no commit; tables said "not recorded").
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout.strip()
  clean = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode == 0
  assert report["commit"] == head + ("" if clean else "+changes")
  ceilings = report["ceilings"]
  for key in ("jax_matmul_flops", "torch_matmul_flops", "copy_bandwidth", "matmul_peak_flops",
              "jax_copy_bandwidth", "torch_copy_bandwidth"):
    assert ceilings[key] > 0
  # The bandwidth ceiling is the faster library's copy, as the matmul peak is the faster matmul.
  assert ceilings["copy_bandwidth"] == max(ceilings["jax_copy_bandwidth"],
                                           ceilings["torch_copy_bandwidth"])
  workloads = {row["workload"] for row in report["results"]}
  assert workloads == {"train", "retrieval", "generate", "encode"}
  for row in report["results"]:
    ours = row["rag_jax"]
    for key in ("first_s", "median_s", "min_s", "max_s", "items_per_s"):
      assert ours[key] > 0, (row["case"], key)
    assert ours["system_s"] >= 0, row["case"]  # kernel CPU time per call
    if row["workload"] in ("train", "encode"):
      assert row["ratio_to_peer"] > 0 and 0 < ours["fraction_of_peak"]
      assert row["peer"]["median_s"] > 0 and row["peer"]["host_peak_mib"] > 0
  fixed, mixed = [r for r in report["results"] if r["workload"] == "encode"]
  # The mixed-length corpus: embeddings as transformers', one program per batch shape, and
  # less padding than transformers' corpus-order batches.
  assert mixed["max_abs_diff"] <= 1e-5 and len(mixed["ratio_per_repeat"]) == 2
  ours = mixed["rag_jax"]
  assert ours["compiled_programs"] == len(ours["batch_shapes"]) >= 1
  assert mixed["real_tokens"] <= ours["tokens_run"] < mixed["peer"]["tokens_run"]
  assert fixed["case"] == "DPR context encoder, 16 x 32 tokens"
  train = [r for r in report["results"] if r["workload"] == "train"]
  assert {r["kind"] for r in train} == {"rag_sequence", "rag_token"}
  for row in train:
    assert row["rag_jax"]["compile_s"] > 0 and row["rag_jax"]["memory_plan"]["temp_gib"] > 0
    # Same random weights and inputs: the first-step losses agree up to dropout noise.
    assert row["rag_jax"]["loss_first_step"] == pytest.approx(row["peer"]["loss_first_step"],
                                                              rel=0.1)
  rows = [r for r in report["results"] if r["workload"] == "generate"]
  assert [r["decoding"] for r in rows] == ["beam", "thorough", "thorough", "fast"]
  generate = {r["decoding"]: r for r in rows[::-1]}  # the thorough row at the default setting
  # --rescore: thorough decoding at a second setting (all 3 x 2 candidates of a question in one
  # pass, 3 of the 7 positions per call), against the same transformers call; same tokens.
  other = rows[2]
  assert other["rescore"] == {"setting": "all:3", "rescore_candidates": 6,
                              "rescore_positions": 3}
  assert generate["thorough"]["rescore"]["setting"] == "auto:auto"
  assert other["case"].endswith("rescoring G:W all:3") and other["peer"] == rows[1]["peer"]
  assert other["token_agreement"] == 1.0
  assert other["rescored_candidates"] == rows[1]["rescored_candidates"]
  # float32 on CPU: rag_jax decodes exactly transformers' tokens.
  assert generate["beam"]["token_agreement"] == 1.0
  assert generate["thorough"]["token_agreement"] == 1.0
  # The hand count of thorough decoding counts the distinct candidates the rescoring scored.
  thorough = generate["thorough"]
  assert 1 <= thorough["rescored_candidates"] <= (
      thorough["batch"] * thorough["n_docs"] * thorough["num_beams"])
  recall = [r for r in report["results"] if r["workload"] == "retrieval"]
  assert recall[0]["rag_jax"]["recall@100"] == 1.0  # exact search against numpy's truth
  # --scann=2:0.03,recall=0.9: the default width, then the one tuned on held-out queries.
  fixed, tuned = recall[1:]
  assert fixed["case"] == "ScaNN 283 leaves, 9 searched"
  ours = tuned["rag_jax"]
  assert tuned["case"] == (f"ScaNN 283 leaves, {ours['leaves_to_search']} searched, reorder "
                           f"{ours['reorder']} (tuned to R@100 0.9)")
  assert ours["target_recall"] == 0.9 and ours["calibration_recall"] >= 0.9
  assert 1 <= ours["leaves_to_search"] <= 283 and ours["reorder"] in (150, 200, 300, 400)
  assert [ours["leaves_to_search"], ours["reorder"]] in [
      s[:2] for s in ours["calibration_settings"]]
  assert ours["recall@100"] > 0.8  # the timed queries: another sample of the same kind


def test_faiss_peer_is_the_fastest_at_equal_recall_else_the_most_accurate():
  # Rows shaped as benchmarks/retrieval.py writes them (efSearch 512 at 1M rows: recall@100
  # 0.948, docs/benchmark_results/paper_cpu_1m.json).
  rows = [{"name": "ef128", "recall@100": 0.901, "queries_per_s": 1873.0},
          {"name": "ef256", "recall@100": 0.930, "queries_per_s": 900.0},
          {"name": "ef512", "recall@100": 0.948, "queries_per_s": 436.0},
          {"name": "faiss HNSW", "skipped": "faiss-cpu not installed"}]
  assert faiss_at_recall(rows, 0.92)["name"] == "ef256"  # the fastest that reaches 0.92
  assert faiss_at_recall(rows, 0.90)["name"] == "ef128"
  # Nothing reaches 0.95: the most accurate setting, never the fastest (lowest-recall) one.
  assert faiss_at_recall(rows, 0.9495)["name"] == "ef512"
  assert faiss_at_recall(rows[3:], 0.95) is None and faiss_at_recall(rows, None) is None


def test_hand_flop_count_agrees_with_xla(report):
  # XLA's CPU cost analysis counts every op; the hand count only the matmuls. They must agree
  # to within the elementwise work (softmax, norms, the optimizer), here under 30 %.
  for row in report["results"]:
    if row["workload"] == "train" or "xla_flops" in (row["rag_jax"] or {}):
      assert 1.0 <= row["xla_flops_over_hand"] < 1.3, row["case"]


def test_hand_count_of_decoding_scores_only_generated_positions():
  # max_length 6 holds the decoder start token and 5 generated tokens: 5 decoder steps per
  # hypothesis, and thorough rescoring scores those 5 positions (the start token has no score),
  # written out here for a one-layer BART (d 8, feed-forward 16, vocabulary 50, 7 source tokens).
  cfg = dict(d_model=8, decoder_ffn_dim=16, vocab_size=50, decoder_layers=1, encoder_layers=1,
             encoder_ffn_dim=16)
  d, f, v, src, length = 8, 16, 50, 7, 6
  batch, n_docs, beams, candidates = 2, 3, 2, 5
  encoder = batch * n_docs * (8 * src * d * d + 4 * src * d * f + 4 * src * src * d)
  cross_kv = batch * n_docs * 4 * src * d * d
  step = batch * n_docs * beams * (12 * d * d + 4 * length * d + 4 * src * d + 4 * d * f
                                   + 2 * d * v)
  beam = encoder + cross_kv + (length - 1) * step
  assert flops.rag_generate(cfg, batch, n_docs, beams, length, src, "beam") == beam
  p = length - 1
  scoring = candidates * n_docs * (12 * p * d * d + 4 * p * p * d + 4 * p * src * d
                                   + 4 * p * d * f + 2 * p * d * v)
  assert flops.rag_generate(cfg, batch, n_docs, beams, length, src, "thorough",
                            candidates) == beam + scoring


def test_hand_count_of_a_bert_layer():
  # One BERT-base layer on 128 tokens, written out: Q, K, V, O (4 x 2 * 128 * 768^2), the
  # feed-forward (2 x 2 * 128 * 768 * 3072) and attention (2 x 2 * 128^2 * 768).
  cfg = dict(presets.BERT_BASE, num_hidden_layers=1)
  expected = 4 * 2 * 128 * 768**2 + 2 * 2 * 128 * 768 * 3072 + 2 * 2 * 128**2 * 768
  assert flops.bert_forward(cfg, 1, 128) == expected
  # The passage encoder's last layer: K and V of every token (2 x 2 * 128 * 768^2), the rest
  # for [CLS] alone: Q, O (2 x 2 * 768^2), attention (2 x 2 * 128 * 768), feed-forward.
  last = 2 * 2 * 128 * 768**2 + 2 * 2 * 768**2 + 2 * 2 * 128 * 768 + 2 * 2 * 768 * 3072
  assert flops.dpr_pooled_forward(cfg, 1, 128) == last
  assert flops.dpr_pooled_forward(dict(cfg, num_hidden_layers=12), 3, 128) == 3 * (
      11 * expected + last)


def test_profile_maps_every_traced_op_to_the_program(report):
  # On the CPU every thunk the trace saw is an instruction of the compiled step: none may fall
  # into "not in the program", the matmuls must be found, and the gradient's ops must be told
  # apart from the forward's by their op_name metadata.
  for row in [r for r in report["results"] if r["workload"] == "train"]:
    summary = row["rag_jax"]["profile"]
    assert summary["where"] == "host thunks" and summary["calls"] == 1
    assert summary["op_ms_per_call"] > 0 and 0 < summary["busy_fraction"] <= 1.0 + 1e-6
    categories = summary["by_category"]
    assert not any(label.startswith("not in the program") for label in categories)
    assert {"matmul", "matmul fusion"} & set(categories)
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0)
    components = set(summary["by_component"])
    assert any(c.startswith("backward: RagModel/generator") for c in components)
    assert any(c.startswith("forward: RagModel/generator") for c in components)
    assert summary["top_ops"][0]["share"] >= summary["top_ops"][-1]["share"]
    assert "Profile of " + row["case"] in report_md.render(report)


# A small GPU-style program: a Triton matmul fusion, a cuBLAS custom call, a loop fusion.
HLO = (ROOT / "tests" / "data" / "profile_step.hlo").read_text()


def test_profile_classifies_hlo_instructions_by_hand():
  instructions, computations = profile.parse_hlo(HLO)
  assert set(computations) == {"fused_dot", "fused_add", "main.9"}
  assert profile.category(instructions["gemm_fusion_dot.3"], computations) == "matmul fusion"
  assert profile.category(instructions["custom-call.4"], computations) == "matmul (library)"
  assert profile.category(instructions["loop_add_fusion.5"], computations) == (
      "elementwise fusion")
  assert profile.category(instructions["copy.6"], computations) == "copy / transpose"
  assert profile.category(None, computations).startswith("not in the program")
  assert profile.component("jit(step)/transpose(jvp(RagModel))/generator/decoder/layers_3/fc1/"
                           "dot_general") == "backward: RagModel/generator/decoder/layers_*/fc1"
  assert profile.component("jit(step)/jvp(RagModel)/generator/decoder/layers_11/fc2/"
                           "dot_general") == "forward: RagModel/generator/decoder/layers_*/fc2"
  assert profile.component("jit(step)/add") == "outside grad: (top level)"
  # Inside a CUDA graph every kernel carries the graph's name; the kernel name finds the fusion.
  assert profile._instruction_of("command_buffer_1", "loop_add_fusion_5", instructions) == (
      "loop_add_fusion.5")
  assert profile._instruction_of("command_buffer_1", "nvjet_sm90_tst_128x256", instructions) == (
      "nvjet_sm90_tst_128x256")
  assert profile._instruction_of("copy.6", "copy_6", instructions) == "copy.6"


def test_report_writes_tables_into_a_new_or_existing_markdown_file(report, tmp_path):
  # The docs' tables are regenerated from the JSON between markers; a markdown file that does
  # not exist yet is created (it raised FileNotFoundError), and a second run replaces the block.
  (tmp_path / "tiny.json").write_text(json.dumps(report))
  markdown = tmp_path / "new" / "bench.md"
  report_md.update(markdown, [tmp_path / "tiny.json"])
  first = markdown.read_text()
  assert first.count("<!-- begin tiny -->") == 1 and "| workload | case |" in first
  markdown.write_text("# Title\n\nkept\n" + first)
  report_md.update(markdown, [tmp_path / "tiny.json"])
  second = markdown.read_text()
  assert second.startswith("# Title\n\nkept\n") and second.count("<!-- begin tiny -->") == 1
  assert sorted(p.name for p in markdown.parent.iterdir()) == ["bench.md"]  # no temporaries


def test_max_batch_reads_this_runs_train_row_only(tmp_path):
  # --max_batch predicts from the train group's memory plan in this run's JSON; a file left by
  # an earlier run in the same workdir is replaced when the run starts, never read.
  from benchmarks import runner
  preset = presets.get("tiny")
  options = {"workdir": str(tmp_path), "preset": "tiny", "time_budget_s": 0.0,
             "isolate": "no"}
  row = {"workload": "train", "kind": "rag_sequence", "n_docs": preset.n_docs[0],
         "batch": preset.batch, "dtype": "float32",
         "rag_jax": {"memory_plan": {"temp_gib": 1.0}}}
  (tmp_path / "tiny.json").write_text(json.dumps({"results": [row]}))
  assert runner._train_row(options, preset, "float32") == row
  assert runner._train_row(options, preset, "bfloat16") is None  # another compute dtype
  runner.run(options, ["train"], "test")  # no time budget: nothing runs, the file is this run's
  assert runner._train_row(options, preset, "float32") is None


def test_a_group_stopped_at_the_time_budget_keeps_its_finished_cases(tmp_path, monkeypatch):
  # A child process writes its group's rows after each case; when the budget stops it (here:
  # the child is "killed" after writing one case), the run keeps that case and says so.
  from benchmarks import runner
  row = {"workload": "train", "case": "rag_sequence n_docs=3", "items": 2, "flops_hand": None,
         "rag_jax": {"median_s": 0.5}, "peer": None}

  real_run = subprocess.run

  def stopped(cmd, *args, **kwargs):
    child_out = [a.split("=", 1)[1] for a in cmd if a.startswith("--child_out=")]
    if not child_out:  # not the child (platform.platform() runs `uname -p`)
      return real_run(cmd, *args, **kwargs)
    runner.write_json(runner.partial_path(Path(child_out[0])), [row])
    raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

  monkeypatch.setattr(subprocess, "run", stopped)
  options = {"workdir": str(tmp_path), "preset": "tiny", "time_budget_s": 60.0, "isolate": "yes",
             "dtype": "auto", "repeats": 1, "warmup": 1, "peers": True, "n_docs": [],
             "index_rows": 0, "scann": [], "faiss_ef": [], "hnsw_m": 8}
  report = runner.run(options, ["train"], "test")
  saved = json.loads((tmp_path / "tiny.json").read_text())
  for got in (report, saved):
    (kept,) = got["results"]
    assert kept["case"] == row["case"] and kept["rag_jax"]["items_per_s"] == 4.0
    (error,) = got["errors"]
    assert error["group"] == "train" and "stopped after 60 s" in error["error"]
    assert "kept the 1 case(s) finished before" in error["error"] and "partial" not in error


def test_auto_isolation_runs_every_preset_but_tiny_on_cpu_in_child_processes():
  # A group measured in the process after the training group ran slower for rag_jax alone, so
  # on CPU every preset but tiny (kept in one process for its one-minute run) isolates groups.
  from benchmarks import runner
  for preset in ("tiny", "world", "base", "paper"):
    assert runner.isolates({"isolate": "auto", "preset": preset}, True)
    assert runner.isolates({"isolate": "auto", "preset": preset}, False) == (preset != "tiny")
    assert runner.isolates({"isolate": "yes", "preset": preset}, False)
    assert not runner.isolates({"isolate": "no", "preset": preset}, True)


def test_groups_run_in_child_processes_and_time_each_attention(tmp_path):
  # The default for every preset but tiny on CPU: each group in a child process of its own,
  # its rows and the ceilings collected into the parent's JSON. The train group times each
  # --attention implementation against one peer measurement; cuDNN's needs an NVIDIA GPU, so
  # on the CPU its row holds that error while the XLA row is measured.
  proc = subprocess.run(
      [sys.executable, "benchmark.py", "--preset=tiny", "--workloads=train",
       "--train_kinds=rag_sequence", "--attention=xla,cudnn", "--isolate=yes", "--repeats=1",
       "--warmup=1", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=_user_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stdout + proc.stderr  # the console keeps the error's line
  report = json.loads((tmp_path / "tiny.json").read_text())
  assert report["errors"] == [] and report["options"]["isolate"] == "yes"
  assert report["options"]["attention"] == ["xla", "cudnn"]
  assert report["ceilings"]["matmul_peak_flops"] > 0
  xla, cudnn = report["results"]
  assert (xla["attention"], cudnn["attention"]) == ("xla", "cudnn")
  assert xla["rag_jax"]["median_s"] > 0 and xla["ratio_to_peer"] > 0
  assert "needs an NVIDIA GPU" in cudnn["rag_jax"]["error"] and "ratio_to_peer" not in cudnn
  assert cudnn["peer"] == xla["peer"] and xla["peer"]["median_s"] > 0
  assert "cudnn attention: ValueError" in proc.stdout
  assert "rag_jax failed: ValueError" in report_md.render(report)


BAD_FLAGS = [
    ("--workloads=train,nonsense", "flag --workloads=['train', 'nonsense']: unknown nonsense; "
     "choose from train, retrieval, generate, encode"),
    ("--repeats=-3", "flag --repeats=-3: -3 is not a positive integer"),
    ("--n_docs=abc", "flag --n_docs=['abc']: 'abc': expected whole numbers >= 1"),
    ("--faiss_ef=64,0", "flag --faiss_ef=['64', '0']: '0': expected whole numbers >= 1"),
    ("--scann=2:recall=1.5", "flag --scann=['2:recall=1.5']: '2:recall=1.5': expected "
     "leaves_per_sqrt_n:width[,width...], leaves_per_sqrt_n > 0 and each width a share of the "
     "leaves in (0, 1] or recall=R with R in (0, 1], e.g. 2:0.03,recall=0.95"),
    ("--rescore=4:none", "flag --rescore=['4:none']: rescore setting '4:none': 'none' is not a "
     "positive int, auto or all"),
    ("--train_kinds=rag_token,rag_token", "flag --train_kinds=['rag_token', 'rag_token']: each "
     "may be named once"),
    ("--time_budget_s=0", "flag --time_budget_s=0.0: must be a number of seconds > 5 (a group "
     "starts only with more than 5 s left)"),
    ("--hnsw_m=1", "flag --hnsw_m=1: 1 is not integer >= 2"),
]


@pytest.mark.parametrize("flag,message", BAD_FLAGS, ids=[f for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_any_work(flag, message, tmp_path):
  """Each flag is checked before the first group runs (it used to run the train workload, or
  write a JSON of errors, and exit 0): one line, exit 2, no workdir."""
  proc = subprocess.run([sys.executable, "benchmark.py", flag, f"--workdir={tmp_path / 'b'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60, env=_user_env())
  assert (proc.returncode, proc.stdout) == (2, "")
  assert proc.stderr == f"error: {message} (see python benchmark.py --help)\n"
  assert not (tmp_path / "b").exists()


def test_flag_choices_are_the_workloads():
  assert train_step.KINDS == cli.TRAIN_KINDS
  assert cli.rescore_setting("all:auto", presets.get("tiny"), 3) == (
      3 * presets.get("tiny").num_beams, None)
