"""The command line on a Hugging Face Trainer output directory (``--run``) and data files, with
no Python task file: a tiny GPT-2 trained by the Trainer with AdamW, its word-level tokenizer
saved with the run."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
from lm_helpers import tiny_gpt2

from source_proj.cli.data_files import tokenised_rows
from source_proj.cli.main import main

pytest.importorskip("transformers")
WORDS = "abcdefghij"  # token id i is the word WORDS[i]
SETTINGS = ["--proj-dim", "32", "--num-segments", "2"]


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS (ids 0..9), built here: nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def as_text(ids: list[int]) -> str:
    return " ".join(WORDS[t] for t in ids)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, train ids, query ids): root holds run/ (a Trainer run: AdamW, 6 steps, a checkpoint
    every 3, tokenizer saved) and train.jsonl, queries.jsonl (text rows)."""
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    root = tmp_path_factory.mktemp("hf_run")
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 10, (12, 6), generator=gen).tolist()
    queries = torch.randint(0, 10, (3, 6), generator=gen).tolist()
    assert len({tuple(r) for r in train}) == len(train)  # distinct rows: no tied scores
    args = TrainingArguments(
        output_dir=str(root / "run"), per_device_train_batch_size=4, max_steps=6, save_steps=3, logging_steps=1,
        learning_rate=0.01, optim="adamw_torch", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    data = datasets.Dataset.from_dict({"input_ids": train, "labels": train})
    Trainer(model=tiny_gpt2(), args=args, train_dataset=data, processing_class=word_tokenizer(),
            data_collator=default_data_collator).train()  # equal lengths: no padding
    for name, rows in (("train", train), ("queries", queries)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": as_text(r), "id": i}) + "\n"
                                                    for i, r in enumerate(rows)))
    return root, train, queries


def test_a_trainer_run_is_attributed_from_the_command_line_as_the_python_api_does(run, tmp_path, capsys):
    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.trajectory.hf_trainer import trainer_trajectory

    root, train, queries = run
    files = ["--run", str(root / "run"), "--train", str(root / "train.jsonl")]
    store = str(tmp_path / "feats.zarr")
    assert main(["fit", *files, "--store", store, "--quiet", *SETTINGS]) == 0
    capsys.readouterr()
    assert main(["topk", *files, "--queries", str(root / "queries.jsonl"), "--store", store, "-k", "4",
                 "--quiet", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    # The Python API on the same run, the rows given as the token ids they were made from.
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory = trainer_trajectory(root / "run", model=model)
    assert trajectory.optimizer == "adamw" and all(c.optimizer_state for c in trajectory.checkpoints)
    att = SourceAttributor(model, CausalLMTask(reduction="mean"), trajectory, proj_dim=32, num_segments=2,
                           progress=False).fit({"input_ids": train})
    scores = att.score({"input_ids": queries})
    for q in range(len(queries)):
        for kind, descending in (("proponents", True), ("opponents", False)):
            got = [r for r in records if r["query"] == q and r["kind"] == kind]
            assert [r["train_id"] for r in got] == scores[q].argsort(descending=descending)[:4].tolist()
            for r in got:
                assert r["score"] == pytest.approx(float(scores[q, r["train_id"]]), rel=1e-4, abs=1e-7)
                assert r["train_text"] == as_text(train[r["train_id"]])  # the tokens decoded
            assert got[0]["query_text"] == as_text(queries[q])
    assert main(["self-influence", "--store", store, *files, "--top", "3", "--format", "json"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert [r["train_id"] for r in top] == torch.argsort(att.self_influence(), descending=True)[:3].tolist()


def _write(path, rows: list[dict]) -> None:
    """``rows`` as the data file ``path`` (its format from the suffix; a folder: save_to_disk)."""
    import datasets
    import pandas as pd

    columns = {k: [r[k] for r in rows] for k in rows[0]}
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        frame = pd.DataFrame({k: [json.dumps(v) if isinstance(v, list) else v for v in vs] for k, vs in columns.items()})
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(columns).to_parquet(path)
    else:
        datasets.Dataset.from_dict(columns).save_to_disk(str(path))


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet", "saved_dataset"])
def test_every_data_file_format_gives_the_same_tokens_and_labels(tmp_path, name):
    ids = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 0]]
    labels = ["neg", "pos", "neg"]
    path = tmp_path / name
    _write(path, [{"text": as_text(r), "label": y} for r, y in zip(ids, labels)])
    got = tokenised_rows(path, word_tokenizer(), "sequence_classification", label2id={"neg": 0, "pos": 1}, num_labels=2,
                         max_length=4)
    assert got.columns["input_ids"] == [r[:4] for r in ids]
    assert got.columns["attention_mask"] == [[1] * len(r[:4]) for r in ids]
    assert got.columns["labels"] == [0, 1, 0]
    assert got.texts == [as_text(r[:4]) for r in ids]
    # Token ids already in the file (a JSON list in CSV), no tokenizer needed; token labels per token.
    tagged = tmp_path / f"tagged_{name}"
    _write(tagged, [{"input_ids": r, "tags": [t % 3 for t in r]} for r in ids])
    got = tokenised_rows(tagged, None, "token_classification", label_column="tags")
    assert got.columns["input_ids"] == ids and got.columns["labels"] == [[t % 3 for t in r] for r in ids]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_columns_missing_checkpoints_and_wrong_query_files_are_one_line_errors(run, tmp_path, capsys):
    root, _, _ = run
    store = str(tmp_path / "feats.zarr")
    files = ["--run", str(root / "run"), "--train", str(root / "train.jsonl")]
    err = _one_line_error(capsys, ["fit", *files, "--store", store, "--text-column", "body", "--quiet"])
    assert "has no text (--text-column) column 'body'" in err and "train.jsonl" in err and "['id', 'text']" in err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    err = _one_line_error(capsys, ["fit", "--run", str(empty), "--train", str(root / "train.jsonl"), "--store", store])
    assert "holds no checkpoint-<step>/ folders" in err and str(empty) in err
    wrong = tmp_path / "questions.csv"
    _write(wrong, [{"question": "a b c"}])
    assert main(["fit", *files, "--store", store, "--quiet", *SETTINGS]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["topk", *files, "--queries", str(wrong), "--store", store, "--quiet"])
    assert "questions.csv has no text (--text-column) column 'text'; its columns are ['question']" in err
    with pytest.raises(SystemExit):  # --task and --run are exclusive
        main(["fit", *files, "--task", "x.py:task", "--store", store])


WARNING_TASK = textwrap.dedent(
    """
    import warnings
    import torch
    from source_proj.cli.task_spec import TaskSpec
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    class Noisy(torch.nn.Linear):
        def forward(self, x):
            warnings.warn("noisy layer: called")  # a library warning repeated at every batch
            warnings.warn("There is a performance drop because we have not yet implemented the batching rule for x")
            return super().forward(x)

    def task():
        torch.manual_seed(0)
        model = Noisy(4, 3)
        trajectory = Trajectory((Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, steps=1, lr=0.1),))
        x = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))
        return TaskSpec(model=model, task="classification", trajectory=trajectory, train=(x, torch.arange(8) % 3),
                        queries=(x[:2], torch.tensor([0, 1])), config={"proj_dim": 8, "num_segments": 1})
    """
)


def test_every_subcommand_shares_the_common_flags_and_warns_once(tmp_path, capsys):
    from source_proj.cli.main import build_parser

    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        flags = {flag for action in sub._actions for flag in action.option_strings}
        assert {"--quiet", "--debug", "--device"} <= flags, name
    path = tmp_path / "noisy.py"
    path.write_text(WARNING_TASK)
    ref, store = f"{path}:task", str(tmp_path / "noisy.zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as a user's environment may ask: the command still says it once
        assert main(["fit", "--task", ref, "--store", store, "--quiet", "--batch-size", "2"]) == 0
    messages = [str(w.message) for w in caught]
    assert messages.count("noisy layer: called") == 1
    assert not [m for m in messages if "batching rule" in m]
    capsys.readouterr()
    assert main(["topk", "--task", ref, "--store", store, "--quiet", "-k", "2", "--json"]) == 0
    as_json = capsys.readouterr().out
    assert main(["topk", "--task", ref, "--store", store, "--quiet", "-k", "2", "--format", "json"]) == 0
    records = json.loads(as_json)
    assert as_json == capsys.readouterr().out and len(records) == 2 * 2 * 2
    assert set(records[0]) == {"query", "kind", "rank", "train_id", "score"}


def test_building_the_parser_imports_neither_torch_nor_curation(capsys):
    import subprocess
    import sys

    probe = ("import sys; from source_proj.cli.main import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'source_proj.curation', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    with pytest.raises(SystemExit):  # the rankings are still checked, and listed, when asked for
        main(["curate", "--task", "x.py:task", "--store", "s", "--rank-by", "nope"])
    assert "invalid choice: 'nope' (choose from 'auto', 'self_influence'" in capsys.readouterr().err


def test_a_sequence_classifier_run_is_classification_with_named_labels(tmp_path, capsys):
    """A GPT-2 sequence classifier trained by the Trainer (SGD), labels named in its config: the
    command line reads the task (classification) and maps the data file's label names through
    config.label2id; its top-k equals the Python API's on the same rows."""
    import datasets
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from source_proj.attributor import SourceAttributor
    from source_proj.trajectory.hf_trainer import trainer_trajectory

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 10, (12, 5), generator=gen).tolist()  # no 0: the pad token GPT-2 pools by
    labels = [int(sum(r) % 2) for r in ids]
    config = GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2, num_labels=2, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, id2label={0: "neg", 1: "pos"},
                        label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                             learning_rate=0.1, optim="sgd", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=GPT2ForSequenceClassification(config), args=args, processing_class=word_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}),
            data_collator=default_data_collator).train()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": as_text(r), "label": ["neg", "pos"][y]}) + "\n"
                                                  for r, y in zip(ids, labels)))
    files = ["--run", str(tmp_path / "run"), "--train", str(tmp_path / "train.jsonl"), "--store",
             str(tmp_path / "cls.zarr"), "--quiet"]
    assert main(["fit", *files, *SETTINGS]) == 0
    capsys.readouterr()
    assert main(["topk", *files, "--queries", str(tmp_path / "train.jsonl"), "-k", "3", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory = trainer_trajectory(tmp_path / "run", model=model)
    rows = {"input_ids": ids, "labels": labels}
    scores = SourceAttributor(model, "classification", trajectory, proj_dim=32, num_segments=2,
                              progress=False).fit(rows).score(rows)
    for q in range(len(ids)):
        got = [r for r in records if r["query"] == q and r["kind"] == "proponents"]
        assert [r["train_id"] for r in got] == scores[q].argsort(descending=True)[:3].tolist()
        for r in got:
            assert r["score"] == pytest.approx(float(scores[q, r["train_id"]]), rel=1e-4, abs=1e-7)


def test_query_files_of_a_trainer_run_are_data_files_answered_in_one_process(run, tmp_path, capsys):
    root, _, _ = run
    files = ["--run", str(root / "run"), "--train", str(root / "train.jsonl")]
    store = str(tmp_path / "feats.zarr")
    assert main(["fit", *files, "--store", store, "--quiet", *SETTINGS]) == 0
    assert main(["topk", *files, "--queries", str(root / "queries.jsonl"), "--store", store, "-k", "3", "--quiet",
                 "--json"]) == 0
    separate = json.loads(capsys.readouterr().out)
    # The same query file listed twice, and a missing one between them: one JSON line each.
    listed = tmp_path / "list.txt"
    missing = str(tmp_path / "absent.jsonl")
    listed.write_text(f"{root / 'queries.jsonl'}\n{missing}\n{root / 'queries.jsonl'}\n")
    code = main(["topk", *files, "--store", store, "-k", "3", "--quiet", "--query-files", str(listed)])
    out = capsys.readouterr()
    assert code == 2
    answers = [json.loads(line) for line in out.out.splitlines()]
    assert [a["query_file"] for a in answers] == [str(root / "queries.jsonl"), missing, str(root / "queries.jsonl")]
    assert missing in answers[1]["error"]
    for answer in (answers[0], answers[2]):
        got = answer["results"]
        assert len(got) == len(separate) > 0
        for mine, theirs in zip(got, separate):
            assert (mine["query"], mine["kind"], mine["rank"], mine["train_id"]) == (
                theirs["query"], theirs["kind"], theirs["rank"], theirs["train_id"])
            assert mine["score"] == pytest.approx(theirs["score"], rel=1e-6, abs=1e-9)
