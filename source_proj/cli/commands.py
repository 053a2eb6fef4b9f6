"""The ``fit``, ``score``, ``topk``, ``self-influence``, ``curate`` and ``verify`` subcommands of
``source-proj``.

A run is described by a Python function named with ``--task file.py:function`` (or
``module:function``) returning a ``source_proj.cli.task_spec.TaskSpec``: model, task, trajectory,
training rows and query rows. ``fit`` featurises the training rows into a feature store once;
the other commands read it. Results go to standard output (or ``--output``), progress bars
and messages to standard error. Errors a user can cause or fix (bad input, NaN/inf, a
mismatched, damaged or locked store) end the command with one line on standard error and
exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from source_proj.errors import InputError, SourceProjError

TASK_HELP = (
    "the run to attribute: path/to/file.py:function or module:function, a function with no "
    "arguments returning a source_proj.cli.task_spec.TaskSpec (model, task, trajectory, train rows, "
    "query rows; see that module's documentation, which has a language-model example); for a "
    "Hugging Face Trainer run, --run needs no Python"
)
RUN_HELP = (
    "instead of --task: a Hugging Face Trainer output directory (checkpoint-<step>/ folders): model, "
    "tokenizer, trajectory and task read from it; rows from --train and --queries"
)
STORE_HELP = "the feature store directory written by 'source-proj fit'"


def _load_spec(args: argparse.Namespace) -> Any:
    """The TaskSpec of ``--task``, or of ``--run`` with the ``--train`` / ``--queries`` data files."""
    return _load_spec_and_reader(args)[0]


def _load_spec_and_reader(args: argparse.Namespace) -> tuple[Any, Callable[[str], Any]]:
    """(:func:`_load_spec`, a function reading one more query file as the task's queries are
    given: rows saved with ``torch.save`` for ``--task``, a data file for ``--run``)."""
    if getattr(args, "run", None) is None:
        from source_proj.cli.task_spec import load_task

        return load_task(args.task), _query_rows
    from source_proj.cli.hf_run import run_task_and_reader

    if args.train is None:
        raise InputError(f"--run {args.run} needs --train FILE|DIR: the training rows the run was trained on")
    return run_task_and_reader(args.run, args.train, args.queries, task_type=args.task_type,
                               text_column=args.text_column, label_column=args.label_column, max_length=args.max_length)


def _spec_name(args: argparse.Namespace) -> str:
    """How messages name the task: the --task reference, or the --run folder and its data files."""
    if getattr(args, "run", None) is None:
        return str(args.task)
    return f"--run {args.run} (--queries {args.queries})"


def _log(message: str) -> None:
    from source_proj.distributed.group import ProcessGroup

    if ProcessGroup.current().is_main:  # under torchrun, one voice
        print(message, file=sys.stderr)


# Commands that run under torchrun (the others are refused there: they write outputs that
# several processes would race for, and run fast in one process).
_DISTRIBUTED = ("fit", "score", "topk", "self-influence")


def _each_warning_once() -> None:
    """Within a command (inside ``warnings.catch_warnings``, which restores all this): each
    warning shown once, however often it is raised (a chunked loop would repeat it per chunk),
    and PyTorch's vmap fallback notice for a missing batching rule, which adds nothing to the
    library's own vmap warning, not at all. The filters' own "once" is not used: Python forgets
    what it showed whenever a module changes the filters, as lazily imported libraries do."""
    shown: set[tuple[str, type]] = set()
    show = warnings.showwarning

    def show_once(message: Warning | str, category: type[Warning], *where: Any, **kw: Any) -> None:
        if (str(message), category) not in shown:
            shown.add((str(message), category))
            show(message, category, *where, **kw)

    warnings.showwarning = show_once
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                            "the batching rule")


def reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the library's own errors (``SourceProjError``: bad input, NaN/inf, a mismatched,
    damaged, locked or missing store, a bad task, a failed rank) and operating-system errors
    (a missing file, a full disk) into a one-line message and exit code 2, unless ``--debug``
    asks for the traceback; anything else is a bug and keeps its traceback."""

    def run(args: argparse.Namespace) -> int:
        with warnings.catch_warnings():
            _each_warning_once()
            return guarded(args)

    def guarded(args: argparse.Namespace) -> int:
        import torch

        from source_proj.distributed.group import ProcessGroup, distributed, init_from_environment, rank_device

        joined_here = not torch.distributed.is_initialized()
        group = ProcessGroup()
        try:
            group = init_from_environment(getattr(args, "device", None))
            with distributed(group):
                if group.distributed:
                    if args.command not in _DISTRIBUTED:
                        raise InputError(f"'{args.command}' runs in one process; under torchrun use one of "
                                         f"{list(_DISTRIBUTED)}")
                    if getattr(args, "device", None) is not None:
                        args.device = rank_device(args.device)
                code = handler(args)
            if group.distributed:  # leave together: no rank closes its connections while another still talks
                torch.distributed.barrier()
            return code
        except (SourceProjError, OSError) as exc:
            if args.debug:
                raise
            if group.is_main:  # under torchrun, one voice
                _log(f"source-proj {args.command}: error: {exc}")
            return 2
        finally:
            if joined_here and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    return run


@contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None or path == "-":
        yield sys.stdout
        return
    with open(path, "w", newline="") as handle:
        yield handle
    _log(f"wrote {path}")


def _write_records(records: list[dict[str, Any]], columns: list[str], fmt: str, path: str | None) -> None:
    from source_proj.distributed.group import ProcessGroup

    if not ProcessGroup.current().is_main:  # under torchrun every rank has the results; one writes them
        return
    with _output(path) as out:
        if fmt == "json":
            json.dump(records, out, indent=1)
            out.write("\n")
        else:
            writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)


# ----------------------------------------------------------------------------- fit
def _attributor_for_fit(args: argparse.Namespace, spec: Any) -> Any:
    from source_proj.config import SourceConfig

    settings = dict(spec.config)
    settings.update(_given_settings(args))
    settings["progress"] = not args.quiet
    return spec.attributor(SourceConfig(**settings))


def _fit(args: argparse.Namespace) -> int:
    from source_proj.store_fit import fit_store

    spec = _load_spec(args)
    attributor = _attributor_for_fit(args, spec)
    store, report = fit_store(
        attributor, spec.train, args.store, dtype=args.dtype, chunk_rows=args.chunk_rows, **spec.fit_options
    )
    layout = store.layout
    repaired = f" ({len(report.repaired_chunks)} of them found damaged and recomputed)" if report.repaired_chunks else ""
    _log(
        f"feature store {store.path}: {layout.n_rows} training rows x {layout.dim} features "
        f"({layout.dtype}), {attributor.num_segments} segments, k = {attributor.proj_dim}; "
        f"{len(report.computed_chunks)} chunks computed now{repaired}, {report.skipped_chunks} found done"
    )
    return 0


# ------------------------------------------------------------------- query commands
def _store_attributor(args: argparse.Namespace, spec: Any) -> tuple[Any, Any]:
    """(store, attributor): the task's attributor with the settings the store was made with,
    and the store, checked against it."""
    from source_proj.features.store import FeatureStore
    from source_proj.store_fit import check_training_data, open_store, store_config

    config = store_config(FeatureStore.open(args.store), progress=not args.quiet, **_runtime(args))
    attributor = spec.attributor(config)
    store = open_store(attributor, args.store)
    # Train ids are rows of the task's training data: it must be the data the store holds.
    # A spot check (first and last chunk); 'source-proj verify --task' checks every chunk.
    check_training_data(attributor, store, spec.train, chunks=[0, store.layout.n_chunks - 1])
    return store, attributor


def _query_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, list[int] | None, Any]:
    """(store, attributor, query features (n_query, D) float32, segments or None, the TaskSpec)."""
    from source_proj.cli.task_spec import TaskSpecError

    spec = _load_spec(args)
    if spec.queries is None:
        raise TaskSpecError(f"{_spec_name(args)} gives no queries (TaskSpec.queries, or --queries with --run) to explain")
    store, attributor = _store_attributor(args, spec)
    queries, segments = _query_features(args, store, attributor, spec.queries)
    return store, attributor, queries, segments, spec


def _query_features(args: argparse.Namespace, store: Any, attributor: Any, rows: Any) -> tuple[Any, list[int] | None]:
    """(query features (n_query, D) float32, segments or None) of the query ``rows`` (``--stage``
    restricts them to that stage's segments)."""
    from source_proj.store_fit import stage_restriction

    queries = attributor.query_features(rows).numpy()
    if args.stage is None:
        return queries, None
    return stage_restriction(attributor, store, args.stage, queries)


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SourceConfig`` fields given on the command line: their flags (``_setting_flags``)
    and the common ``--device``; each flag's destination is its field's name."""
    from source_proj.config import SourceConfig

    names = [f.name for f in dataclasses.fields(SourceConfig)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    from source_proj.config import RUNTIME_FIELDS

    return {name: value for name, value in _given_settings(args).items() if name in RUNTIME_FIELDS}


def _score(args: argparse.Namespace) -> int:
    from source_proj.retrieval.bulk import score_matrix

    _check_output(args.out)
    store, _, queries, segments, _ = _query_setup(args)

    def recomputing(damaged: dict[int, str]) -> None:
        _log(f"{len(damaged)} written chunks of {args.out} are damaged (first: {next(iter(damaged.values()))}): "
             "recomputing them")

    scores = score_matrix(
        store, queries, args.out, segments=segments, query_block=args.query_block, progress=not args.quiet,
        on_damaged=recomputing,
    )
    _log(f"scores {scores.shape[0]} queries x {scores.shape[1]} training rows (float32) in {args.out}/scores")
    return 0


def _topk_results(args: argparse.Namespace, store: Any, queries: Any, segments: list[int] | None) -> dict[str, Any]:
    from source_proj.distributed.group import ProcessGroup

    kinds = ["proponents", "opponents"] if args.kind == "both" else [args.kind]
    if args.index == "ivf":
        if ProcessGroup.current().distributed:
            raise InputError("--index ivf runs in one process; under torchrun the exact search is shared by the ranks")
        if segments is not None:
            raise InputError("--index ivf searches the full features; it cannot be combined with --stage")
        index = _ivf_index(args, store, queries)
        exact = [kind for kind in kinds if not index.worth_using(kind == "opponents")]
        if exact:
            _log(f"the IVF index does not reach recall {index.recall['target']} for {exact}: searching them exactly")
        results = {}
        for kind in kinds:
            if kind not in exact:
                results[kind] = index.search(queries, args.k, opponents=kind == "opponents")
                if index.exact_fallbacks:
                    _log(f"{index.exact_fallbacks} queries had fewer than {args.k} {kind} in the probed IVF cells: "
                         "searched exactly")
        if exact:
            results.update(_exact_results(args, store, queries, None, exact))
        return {kind: results[kind] for kind in kinds}
    return _exact_results(args, store, queries, segments, kinds)


def _exact_results(
    args: argparse.Namespace, store: Any, queries: Any, segments: list[int] | None, kinds: list[str]
) -> dict[str, Any]:
    from source_proj.retrieval.exact import (
        SearchSettings,
        exact_proponents_opponents,
        exact_topk,
    )

    settings = SearchSettings(shard_rows=args.shard_rows)
    progress = not args.quiet
    if len(kinds) == 2:
        found = exact_proponents_opponents(store, queries, args.k, segments=segments, settings=settings, progress=progress)
        return dict(zip(kinds, found))
    return {
        kinds[0]: exact_topk(
            store, queries, args.k, opponents=kinds[0] == "opponents", segments=segments, settings=settings,
            progress=progress,
        )
    }


def _ivf_index(args: argparse.Namespace, store: Any, queries: Any) -> Any:
    """The saved IVF index of the store if it is current, else a new one; tuned on (up to)
    the first 100 queries to the requested k and recall unless it was tuned for them, and
    saved beside the store (kept in memory for this run where that is not writable)."""
    from source_proj.retrieval.exact import exact_proponents_opponents
    from source_proj.retrieval.ivf import (
        ApproxIndex,
        IVFSettings,
        StaleIndexError,
        build_ivf,
    )

    try:
        index = ApproxIndex.load(store)
        if index.tuned_for(args.k, args.ivf_recall):
            _log(f"using the IVF index saved beside the store (measured recall {index.recall})")
            return index
        _log(f"the IVF index saved beside the store was tuned for k = {index.recall.get('k')}, recall "
             f"{index.recall.get('target')}: retuning it for k = {args.k}, recall {args.ivf_recall}")
    except (FileNotFoundError, StaleIndexError) as exc:
        _log(f"building an IVF index ({exc})")
        index = build_ivf(store, IVFSettings(), progress=not args.quiet)
    tune = queries[:100]
    exact = exact_proponents_opponents(store, tune, args.k, progress=not args.quiet)
    recall = index.tune(tune, *exact, target=args.ivf_recall)
    try:
        where = f"saved to {index.save(store)}"
    except OSError as exc:
        where = f"not saved ({exc}): kept in memory for this run"
    _log(f"IVF recall@{args.k} on {len(tune)} queries: {recall}; {where}")
    return index


def _topk(args: argparse.Namespace) -> int:
    _check_output(args.output)
    if args.query_files is not None:
        return _topk_stream(args)
    store, _, queries, segments, spec = _query_setup(args)
    results = _topk_results(args, store, queries, segments)
    records, columns = _topk_records(results, spec.texts("queries"), spec.texts("train"))
    _write_records(records, columns, args.format, args.output)
    return 0


def _topk_records(
    results: dict[str, Any], query_text: list[str] | None, train_text: list[str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The output rows of ``topk`` (one per result) and their columns."""
    records: list[dict[str, Any]] = [
        {"query": q, "kind": kind, "rank": rank + 1, "train_id": int(found.ids[q, rank]),
         "score": float(found.scores[q, rank])}
        for kind, found in results.items()
        for q in range(found.ids.shape[0])
        for rank in range(found.ids.shape[1])
    ]
    columns = ["query", "kind", "rank", "train_id", "score"]
    if query_text is not None:
        columns.insert(1, "query_text")
        for r in records:
            r["query_text"] = query_text[r["query"]]
    if train_text is not None:
        columns.insert(columns.index("train_id") + 1, "train_text")
        for r in records:
            r["train_text"] = train_text[r["train_id"]]
    return records, columns


def _topk_stream(args: argparse.Namespace) -> int:
    """``topk --query-files``: the task and the store are opened once, then each query file
    listed (one path per line) is answered as soon as its line is read, with one JSON line
    (flushed). A query set that fails gives an error line naming its file and the next is
    answered; the exit code is then 2."""
    from source_proj.distributed.group import ProcessGroup

    if ProcessGroup.current().distributed:
        raise InputError("--query-files runs in one process (it reads the list as it comes); run it without torchrun")
    spec, read_queries = _load_spec_and_reader(args)
    store, attributor = _store_attributor(args, spec)
    train_text = spec.texts("train")
    failed = 0
    with _query_list(args.query_files) as paths, _output(args.output) as out:
        for line in iter(paths.readline, ""):
            path = line.strip()
            if not path:
                continue
            try:
                queries, segments = _query_features(args, store, attributor, read_queries(path))
                records, _ = _topk_records(_topk_results(args, store, queries, segments), None, train_text)
                answer: dict[str, Any] = {"query_file": path, "results": records}
            except (SourceProjError, OSError) as exc:
                if args.debug:
                    raise
                failed += 1
                _log(f"source-proj topk: error: query file {path}: {exc}")
                answer = {"query_file": path, "error": str(exc)}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    return 2 if failed else 0


@contextmanager
def _query_list(path: str) -> Iterator[TextIO]:
    """The list of query files: standard input for "-", else the file ``path``."""
    if path == "-":
        yield sys.stdin
        return
    with open(path) as handle:
        yield handle


def _query_rows(path: str) -> Any:
    """The query rows saved with ``torch.save`` in ``path``, in a form ``TaskSpec.queries``
    takes (an (inputs, targets) tuple of tensors, a dict of tensors such as {"input_ids": ...});
    ``InputError`` naming the file for one that is not a torch file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"query file {path} cannot be read as rows saved with torch.save: {reason}") from exc


def _self_influence(args: argparse.Namespace) -> int:
    import numpy as np

    from source_proj.features.store import FeatureStore

    _check_output(args.output)
    values = FeatureStore.open(args.store).self_influence()
    order = np.argsort(-values, kind="stable")
    if args.top is not None:
        order = order[: args.top]
    records = [{"rank": r + 1, "train_id": int(m), "self_influence": float(values[m])} for r, m in enumerate(order)]
    columns = ["rank", "train_id", "self_influence"]
    if args.task is not None or args.run is not None:
        from source_proj.cli.task_spec import TaskSpecError

        texts = _load_spec(args).texts("train")
        if texts is None:
            raise TaskSpecError(f"{_spec_name(args)} gives no train_text for the text column")
        if len(texts) != len(values):
            raise TaskSpecError(f"{_spec_name(args)} has {len(texts)} training rows but the store {len(values)}")
        columns.insert(2, "train_text")
        for r in records:
            r["train_text"] = texts[r["train_id"]]
    _write_records(records, columns, args.format, args.output)
    return 0


# ----------------------------------------------------------------------------- curate
def _explain(args: argparse.Namespace, store: Any, attributor: Any, queries: Any) -> int:
    from source_proj.curation import row_effects

    effects = row_effects(attributor, store, queries, args.explain, k=args.k)
    records = [
        {"train_id": effects.row, "effect": effect, "rank": r + 1, "query": int(q), "loss_change": float(v)}
        for effect, ids, values in (("helps", effects.helped, effects.helped_scores),
                                    ("hurts", effects.hurt, effects.hurt_scores))
        for r, (q, v) in enumerate(zip(ids, values))
    ]
    _write_records(records, ["train_id", "effect", "rank", "query", "loss_change"], "csv", args.output)
    return 0


def _curate(args: argparse.Namespace) -> int:
    from source_proj.cli.task_spec import query_set
    from source_proj.curation import (
        CurationConfig,
        curate,
        final_losses,
        query_set_harm,
        training_labels,
        write_curation,
    )

    spec = _load_spec(args)
    config = CurationConfig(
        rank_by=args.rank_by, flag_fraction=args.flag_fraction, harm_weight=args.harm_weight,
        weight_floor=args.weight_floor, weight_width=args.weight_width,
    )
    queries = None if args.against is None else query_set(spec, args.against)
    store, attributor = _store_attributor(args, spec)
    progress = not args.quiet
    if args.explain is not None:
        if queries is None:
            raise InputError("--explain ROW needs --against QUERY_SET: the queries it helps and hurts")
        return _explain(args, store, attributor, queries)
    if args.out is None:
        raise InputError("--out DIR is required (where the table, keep-mask and weights go)")
    table = curate(
        self_influence=store.self_influence(),
        losses=final_losses(attributor, spec.train, progress=progress),
        harm=None if queries is None else query_set_harm(attributor, store, queries, progress=progress),
        labels=training_labels(spec.train),
        config=config,
    )
    try:
        paths = write_curation(table, args.out, args.format)
    except ImportError as exc:
        raise InputError(str(exc)) from exc
    _log(
        f"ranked {len(table)} training rows by {table.ranking}; flagged {int(table.column('flag').sum())} "
        f"({config.flag_fraction:.1%}); wrote {paths['table']}, {paths['keep']} (bool keep-mask) and "
        f"{paths['weights']} (per-row weights)"
    )
    return 0

# ----------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    from source_proj.cli.report import ReportInputs, render_report, row_viewer

    _check_output(args.output)
    store, _, queries, segments, spec = _query_setup(args)
    shown = queries[: args.max_queries]
    results = {kind: (found.ids, found.scores)
               for kind, found in _exact_results(args, store, shown, segments, ["proponents", "opponents"]).items()}
    settings = {"store": store.path, "training rows": store.layout.n_rows, "features": store.layout.dim,
                **store.metadata.get("source_config", {})}
    page = render_report(ReportInputs(
        title=_spec_name(args), results=results, query_view=row_viewer(spec.queries, spec.texts("queries")),
        train_view=row_viewer(spec.train, spec.texts("train")), self_influence=store.self_influence(),
        flag_fraction=args.flag_fraction, settings=settings, digest=store.content_token(), curation=args.curation,
    ))
    with _output(args.output) as out:
        out.write(page)
    return 0


# ----------------------------------------------------------------------------- verify
def _verify(args: argparse.Namespace) -> int:
    from source_proj.features.errors import StoreCorruptError
    from source_proj.features.store import FeatureStore
    from source_proj.retrieval.bulk import is_output

    if is_output(args.store):
        return _verify_output(args)
    store = FeatureStore.open(args.store)  # checks the settings' checksum
    problems = []
    try:
        store.verify_curvature()
    except StoreCorruptError as exc:
        problems.append(str(exc))
    damaged = store.damaged_chunks(progress=not args.quiet)
    problems += damaged.values()
    pending = store.pending_chunks()
    if args.task is not None or args.run is not None:
        problems += _verify_against_task(args, store)
    for problem in problems:
        _log(f"problem: {problem}")
    layout = store.layout
    state = "complete" if not pending else f"incomplete ({len(pending)} of {layout.n_chunks} chunks pending)"
    checked = " and against the task's model, trajectory and training data" if args.task or args.run else ""
    verdict = f"{len(problems)} problems found" if problems else "no problem found"
    _log(f"feature store {store.path}: {layout.n_rows} rows in {layout.n_chunks} chunks, {state}; every written "
         f"chunk checked against its digests{checked}: {verdict}")
    return 1 if problems else 0


def _verify_output(args: argparse.Namespace) -> int:
    """``verify`` of a ``score`` (or self-influence) output: every written block against the
    digests of its values."""
    from source_proj.retrieval.bulk import check_output

    if args.task is not None or args.run is not None:
        raise InputError(f"{args.store} is a score output, not a feature store: --task and --run check feature stores")
    found = check_output(args.store)
    for problem in found.damaged.values():
        _log(f"problem: {problem}")
    state = "complete" if not found.pending else f"incomplete ({len(found.pending)} of {found.n_chunks} chunks pending)"
    verdict = f"{len(found.damaged)} problems found" if found.damaged else "no problem found"
    _log(f"output {found.path} ({found.array!r}): {found.n_chunks} chunks, {state}; every written chunk checked "
         f"against the digests of its values: {verdict}")
    return 1 if found.damaged else 0


def _verify_against_task(args: argparse.Namespace, store: Any) -> list[str]:
    """What differs between the store and the task: settings, model, checkpoints, data."""
    from source_proj.store_fit import (
        check_store_settings,
        check_training_data,
        store_config,
    )

    spec = _load_spec(args)
    attributor = spec.attributor(store_config(store, progress=not args.quiet))
    try:
        check_store_settings(attributor, store)
        check_training_data(attributor, store, spec.train)
    except SourceProjError as exc:  # StoreMismatchError, DataMismatchError, invalid labels
        return [str(exc)]
    return []


# ----------------------------------------------------------------------------- parsers
def _common(parser: argparse.ArgumentParser, task_required: bool = True) -> None:
    _task_flags(parser, task_required, TASK_HELP)
    parser.add_argument("--store", required=True, help=STORE_HELP)
    shared_flags(parser)


def _task_flags(parser: argparse.ArgumentParser, required: bool, task_help: str) -> None:
    """--task or --run (one of them), and the data-file flags of --run."""
    from source_proj.cli.data_files import TASK_TYPES

    which = parser.add_mutually_exclusive_group(required=required)
    which.add_argument("--task", help=task_help)
    which.add_argument("--run", metavar="DIR", help=RUN_HELP)
    files = parser.add_argument_group("with --run", "data files: a datasets.save_to_disk folder, JSON lines, CSV, "
                                      "Parquet, or a folder of such files")
    files.add_argument("--train", metavar="FILE|DIR", help="the training rows (row i = train id i)")
    files.add_argument("--queries", metavar="FILE|DIR", help="the rows to explain (row i = query id i)")
    files.add_argument("--text-column", default="text", help="the column of text, tokenised with the run's tokenizer "
                       "where the rows hold no input_ids (default text)")
    files.add_argument("--label-column", help="the targets' column (default label, else labels; a causal LM's "
                       "targets are its tokens)")
    files.add_argument("--max-length", type=_positive_int, help="tokens kept per row (default: all)")
    files.add_argument("--task-type", choices=list(TASK_TYPES),
                       help="the task, where the architecture's name does not tell it")


def shared_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand takes: --quiet, --debug, --device."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    parser.add_argument("--device", help="where gradients are computed, e.g. cpu or cuda (default: the model's; "
                        "commands that compute none ignore it)")


def _setting_flags(parser: argparse.ArgumentParser, recorded: bool) -> None:
    """A flag for every ``SourceConfig`` field that has one and is (``recorded``) or is not a
    recorded setting, generated from the field's metadata (``config._setting``): its name, how
    it parses, its help, its default and its help section (the field's group). Each flag's destination is the field's name; an
    absent flag is None (the task's ``TaskSpec.config``, then the default, apply)."""
    from source_proj.config import SourceConfig

    groups: dict[str, Any] = {}
    for f in dataclasses.fields(SourceConfig):
        meta = f.metadata
        if meta["flag"] is None or meta["recorded"] != recorded:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(f"{meta['group']} settings")
        default = "off" if meta["kind"] == "flag" else f.default
        options: dict[str, Any] = {"dest": f.name, "help": f"{meta['help']} (default {default})"}
        if meta["kind"] == "flag":
            options.update(action="store_true", default=None)
        elif meta["kind"] == "choice":
            options["choices"] = list(meta["choices"])
        else:
            options["type"] = _positive_int if meta["kind"] == "positive" else int
            options["metavar"] = meta["flag"].lstrip("-").upper().replace("-", "_")
        groups[meta["group"]].add_argument(meta["flag"], **options)


def _runtime_flags(parser: argparse.ArgumentParser) -> None:
    _setting_flags(parser, recorded=False)


def _query_flags(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    _runtime_flags(parser)
    parser.add_argument("--stage", help="only the segments of this training stage (in the 'final' query mode, "
                        "needs a store fitted with --keep-segments)")


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_output(path: str | None) -> None:
    """Fail before any work if the output file ``path`` cannot be written."""
    if path is None or path == "-":
        return
    from pathlib import Path

    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(path if Path(path).exists() else folder, os.W_OK):
        raise PermissionError(f"cannot write {path}: permission denied")


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["csv", "json"], default="csv", help="output format (default csv)")
    parser.add_argument("--json", dest="format", action="store_const", const="json",
                        help="JSON output, the same as --format json: a list of objects with the columns as keys")
    parser.add_argument("--output", "-o", help="output file (default: standard output)")


class _Rankings:
    """The names of ``curation.settings.RANKINGS`` as argparse choices, imported only when a
    ``--rank-by`` is checked or listed: importing ``source_proj.curation`` (torch, scipy) while
    the parser is built cost every command seconds of start-up (benchmarks/cli_startup.py)."""

    def _names(self) -> tuple[str, ...]:
        from source_proj.curation.settings import RANKINGS

        return tuple(RANKINGS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register fit, score, topk, self-influence and curate on the ``source-proj`` subparsers."""
    fit = sub.add_parser(
        "fit",
        help="featurise a training set into a feature store (resumable)",
        description="Computes the curvature of each training segment and the SOURCE features of every "
        "training row, and writes them chunk by chunk to a feature store (a zarr directory). If it is "
        "interrupted, run the same command again: finished chunks are kept. Settings not given here "
        "come from the task's TaskSpec.config, then from the defaults.",
        epilog="example (the digits demo as a task): source-proj fit --task source_proj.cli.digits_task:task "
        "--store digits.zarr --proj-dim 256",
    )
    _common(fit)
    fit.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                     help="feature precision on disk; float16 halves the size, scores within 2^-11 relative")
    fit.add_argument("--chunk-rows", type=_positive_int, default=4096, help="training rows per store chunk (default 4096)")
    _setting_flags(fit, recorded=True)
    _runtime_flags(fit)
    fit.set_defaults(handler=reporting_errors(_fit))

    score = sub.add_parser(
        "score",
        help="write the full query x training score matrix to a zarr array",
        description="Scores every query of the task against every training row of the store: "
        "score > 0 means the training row raises the query's measurement (for a classification margin: "
        "it helped). Written block by block to OUT/scores, (n_query, N) float32; resumable.",
    )
    _query_flags(score)
    score.add_argument("--out", required=True, help="output zarr directory")
    score.add_argument("--query-block", type=_positive_int, default=1024, help="queries per written block (default 1024)")
    score.set_defaults(handler=reporting_errors(_score))

    topk = sub.add_parser(
        "topk",
        help="the k most helpful (proponents) and most harmful (opponents) training rows per query",
        description="For every query of the task, the k training rows with the largest scores "
        "(proponents) and/or the most negative ones (opponents). One output row per result: query id, "
        "kind, rank (1 = strongest), train id (row of the training data) and score, with query_text and "
        "train_text columns when the task gives TaskSpec.query_text / train_text (for --run: the rows' "
        "tokens decoded). With --json: a list of objects with keys query (int), query_text (str, when given), "
        "kind ('proponents' or 'opponents'), rank (int, 1 = strongest), train_id (int), train_text (str, when "
        "given), score (float).",
        epilog="example: source-proj topk --task source_proj.cli.digits_task:task --store digits.zarr -k 5 "
        "--format json -o top5.json",
    )
    _query_flags(topk)
    topk.add_argument("-k", type=_positive_int, default=10, help="results per query (default 10)")
    topk.add_argument("--kind", choices=["proponents", "opponents", "both"], default="both",
                      help="which results (default both)")
    topk.add_argument("--index", choices=["exact", "ivf"], default="exact",
                      help="exact search (default) or an approximate IVF index, built and saved beside the store "
                      "on first use and tuned on the first 100 queries")
    topk.add_argument("--ivf-recall", type=float, default=0.95, help="recall@k the IVF index is tuned to (default 0.95)")
    topk.add_argument("--shard-rows", type=_positive_int, default=65536,
                      help="training rows searched at a time by the exact search (memory bound; default 65536)")
    topk.add_argument("--query-files", metavar="LIST|-",
                      help="many query sets in one process (start-up paid once): instead of the task's queries, "
                      "answer the query files listed in LIST (- : standard input), one path per line, each as soon "
                      "as its line is read; a query file holds rows saved with torch.save in a form TaskSpec.queries "
                      "takes (--task), or is a data file read as --queries is (--run). Writes one JSON line per file, "
                      "flushed: {\"query_file\": path, \"results\": [objects as with --json]}, or "
                      "{\"query_file\": path, \"error\": message} and on to the next line (exit code 2 at the end)")
    _output_flags(topk)
    topk.set_defaults(handler=reporting_errors(_topk))

    self_inf = sub.add_parser(
        "self-influence",
        help="training rows ranked by self-influence (candidates for mislabeled or atypical data)",
        description="Lists training rows by decreasing self-influence, the predicted rise of a row's own "
        "loss if it were removed: large values flag rows the model memorised rather than learned from "
        "others, often mislabeled or atypical. Computed by 'fit' and read from the store. With --json: a list "
        "of objects with keys rank (int, 1 = largest), train_id (int), train_text (str, with --task or --run), "
        "self_influence (float).",
    )
    self_inf.add_argument("--store", required=True, help=STORE_HELP)
    _task_flags(self_inf, False, "a task whose TaskSpec.train_text adds a train_text column")
    self_inf.add_argument("--top", type=_positive_int, help="only the first N rows (default all)")
    shared_flags(self_inf)
    _output_flags(self_inf)
    self_inf.set_defaults(handler=reporting_errors(_self_influence))

    cur = sub.add_parser(
        "curate",
        help="rank training rows as mislabeled or harmful; write a table, a keep-mask and weights",
        description="Ranks every training row of the store by how suspicious it is: its held-out loss "
        "(its loss at the final model plus its self-influence: the loss SOURCE predicts it would have had "
        "if it had never been trained on; high for wrong labels), its harm to a query set named by "
        "--against (the predicted rise of the set's summed loss when the row is included), or both "
        "(the default when --against is given). Writes OUT/curation.csv (or .parquet: row id, label, score, "
        "rank, flag, weight and the signals), OUT/keep.npy (bool, False for flagged rows) and "
        "OUT/weights.npy (per-row weights for a WeightedRandomSampler or a loss weight). With --explain ROW, "
        "prints instead the queries of --against whose loss that row lowers (helps) and raises (hurts) most.",
        epilog="example: source-proj curate --task my_task.py:task --store feats.zarr --against validation "
        "--out curation/   (TaskSpec.query_sets={'validation': (x_val, y_val)})",
    )
    _common(cur)
    _runtime_flags(cur)
    cur.add_argument("--against", help="a query set of the task: 'queries' (TaskSpec.queries) or a name in "
                     "TaskSpec.query_sets; rows are then also ranked by their harm to it")
    # A metavar: argparse would otherwise list the choices (import curation) as the parser is built.
    cur.add_argument("--rank-by", choices=_Rankings(), default="auto", metavar="RANKING",
                     help="heldout_loss, self_influence, harm, combined (rank average of held-out loss and harm), "
                     "or auto (default): combined with --against, else heldout_loss")
    cur.add_argument("--flag-fraction", type=float, default=0.05, help="fraction of rows flagged (default 0.05)")
    cur.add_argument("--harm-weight", type=float, default=0.5, help="weight of harm in 'combined' (default 0.5)")
    cur.add_argument("--weight-floor", type=float, default=0.0, help="smallest weight of a flagged row (default 0)")
    cur.add_argument("--weight-width", type=float, default=1.0,
                     help="robust spreads of the score above the flag threshold at which weights reach the floor (default 1)")
    cur.add_argument("--out", help="output directory (table, keep.npy, weights.npy)")
    cur.add_argument("--format", choices=["csv", "parquet"], default="csv",
                     help="table format (default csv; parquet needs pyarrow)")
    cur.add_argument("--explain", type=int, metavar="ROW", help="print the queries this training row helps and hurts most")
    cur.add_argument("-k", type=_positive_int, default=10, help="queries listed per direction with --explain (default 10)")
    cur.add_argument("--output", "-o", help="with --explain: output file (default: standard output)")
    cur.set_defaults(handler=reporting_errors(_curate))

    report = sub.add_parser(
        "report",
        help="one self-contained HTML page: each query's proponents and opponents, self-influence, curation",
        description="Writes one HTML file that opens from disk with no server or network (inline CSS, SVG and "
        "images): for each query its top proponents and opponents with scores drawn as bars (rows shown as text "
        "where the task gives texts, the tokens decoded for --run, or as images for 2-D/3-D float inputs), a "
        "histogram of the training rows' self-influence with the flagged tail, the curation table of a 'curate' "
        "output folder (--curation), and the store's settings and digest.",
        epilog="example: source-proj report --run out/ --train train.jsonl --queries questions.jsonl --store "
        "feats.zarr --curation curation/ -o report.html",
    )
    _query_flags(report)
    report.add_argument("-k", type=_positive_int, default=5, help="proponents and opponents shown per query (default 5)")
    report.add_argument("--max-queries", type=_positive_int, default=50, help="queries shown (the first N; default 50)")
    report.add_argument("--flag-fraction", type=float, default=0.05,
                        help="the tail of self-influence marked as flagged (default 0.05)")
    report.add_argument("--curation", metavar="DIR", help="a 'source-proj curate' output folder to show")
    report.add_argument("--output", "-o", default="report.html", help="the HTML file (default report.html)")
    report.set_defaults(handler=reporting_errors(_report), shard_rows=65536)

    verify = sub.add_parser(
        "verify",
        help="check a feature store for damage and, with --task, against the task's model and training data",
        description="Reads every written chunk of the store and checks it against the digests recorded when it "
        "was written (damaged, truncated or missing chunk files), and the stored curvature. With --task, also "
        "checks that the store was made with the task's model, checkpoints and settings, and reads the whole "
        "training set to check that every chunk's rows (inputs and targets) are the ones it was made from. "
        "Given the output directory of 'source-proj score' as --store, checks its written blocks against the "
        "digests of their values (rerun 'score' to recompute damaged ones). Exit code 0: no problem; 1: problems found (listed); 2: the store cannot be opened.",
        epilog="a damaged store is repaired by running the same 'source-proj fit' again: it recomputes the "
        "damaged chunks",
    )
    _common(verify, task_required=False)
    verify.set_defaults(handler=reporting_errors(_verify))
