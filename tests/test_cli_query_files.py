"""``source-proj topk --query-files``: many query sets answered in one process, each as its
line is read, with the answers of separate ``topk`` runs; a bad query file gives an error line
naming it and the process goes on to the next."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import blobs

from source_proj.cli.main import main

TASK_FILE = textwrap.dedent(
    """
    import os
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from tiny_models import blobs, trained_classifier
    from source_proj.cli.task_spec import TaskSpec

    def task():
        model, trajectory, train = trained_classifier(n=40, epochs=2)
        chosen = os.environ.get("TINY_QUERIES")  # a separate run's query set
        queries = blobs(3, 4, 3, seed=9) if chosen is None else torch.load(chosen, weights_only=True)
        return TaskSpec(model=model, task="classification", trajectory=trajectory, train=train,
                        queries=queries, config={{"num_segments": 2}})
    """
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[str]]:
    """(task reference, store, two query files) for a store fitted by the command line."""
    folder = tmp_path_factory.mktemp("query_files")
    task = folder / "tiny_task.py"
    task.write_text(TASK_FILE.format(tests=str(Path(__file__).parent)))
    store = str(folder / "feats.zarr")
    assert main(["fit", "--task", f"{task}:task", "--store", store, "--proj-dim", "8", "--chunk-rows", "16",
                 "--quiet"]) == 0
    files = []
    for seed, n in ((1, 4), (2, 2)):
        path = folder / f"queries-{seed}.pt"
        torch.save(blobs(n, 4, 3, seed=seed), path)
        files.append(str(path))
    return f"{task}:task", store, files


def _separate_run(fitted, query_file: str, monkeypatch, capsys) -> list[dict]:
    """The --json records of a plain topk run whose task's queries are ``query_file``'s rows."""
    task, store, _ = fitted
    monkeypatch.setenv("TINY_QUERIES", query_file)
    code = main(["topk", "--task", task, "--store", store, "-k", "3", "--json", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    monkeypatch.delenv("TINY_QUERIES")
    return json.loads(out.out)


def _assert_same_answers(streamed: list[dict], separate: list[dict]) -> None:
    assert len(streamed) == len(separate) > 0
    for mine, theirs in zip(streamed, separate):
        assert {k: v for k, v in mine.items() if k != "score"} == {k: v for k, v in theirs.items() if k != "score"}
        assert abs(mine["score"] - theirs["score"]) <= 1e-6


class _Lines(io.StringIO):
    """Standard input that, before giving each line after the first, records how many answers
    were written so far (a streaming command has answered every earlier line by then)."""

    def __init__(self, lines: list[str], capsys: pytest.CaptureFixture) -> None:
        super().__init__("".join(f"{line}\n" for line in lines))
        self.capsys, self.calls = capsys, 0
        self.answered_before: list[int] = []
        self.outputs: list[str] = []

    def readline(self, *args) -> str:  # type: ignore[override]
        self.calls += 1
        if self.calls > 1:
            self.outputs.append(self.capsys.readouterr().out)
            self.answered_before.append(sum(out.count("\n") for out in self.outputs))
        return super().readline(*args)


def test_streamed_query_files_answer_as_separate_runs(fitted, monkeypatch, capsys) -> None:
    task, store, files = fitted
    separate = [_separate_run(fitted, f, monkeypatch, capsys) for f in files]
    stdin = _Lines([files[0], "", files[1]], capsys)
    monkeypatch.setattr("sys.stdin", stdin)
    code = main(["topk", "--task", task, "--store", store, "-k", "3", "--query-files", "-", "--quiet"])
    stdin.outputs.append(capsys.readouterr().out)
    assert code == 0
    # Reads after the first: the blank line, the second file, the end. The first answer was
    # written before the blank line was read, the second before the end was.
    assert stdin.answered_before == [1, 1, 2]
    answers = [json.loads(line) for line in "".join(stdin.outputs).splitlines()]
    assert [a["query_file"] for a in answers] == files
    for answer, expected in zip(answers, separate):
        _assert_same_answers(answer["results"], expected)


def test_a_bad_query_file_gives_an_error_line_and_the_next_is_answered(fitted, monkeypatch, capsys, tmp_path) -> None:
    task, store, files = fitted
    expected = _separate_run(fitted, files[1], monkeypatch, capsys)
    missing, garbage = str(tmp_path / "missing.pt"), tmp_path / "notes.txt"
    garbage.write_text("not rows")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{missing}\n{garbage}\n{files[1]}\n")
    out = tmp_path / "answers.jsonl"
    code = main(["topk", "--task", task, "--store", store, "-k", "3", "--query-files", str(listed), "-o", str(out),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["query_file"] for a in answers] == [missing, str(garbage), files[1]]
    assert "missing.pt" in answers[0]["error"] and f"query file {missing}" in err
    assert answers[1]["error"].startswith(f"query file {garbage} cannot be read as rows saved with torch.save")
    _assert_same_answers(answers[2]["results"], expected)
