"""The language-model demo (``source-proj demo --lm``): a character-level GPT-2 trained with
Hugging Face's ``Trainer`` on text that ships with Python, attributed to its training sequences.

The corpus is the Python reference documentation bundled with CPython as
``pydoc_data.topics`` (no download). Each topic is cut into fixed-length windows of
characters; every ``HOLD_OUT``-th window is held out as a query. The model is built from a
``GPT2Config`` (nothing downloaded) and trained by ``transformers.Trainer`` with its default
optimizer (AdamW, warm-up then linear decay, one checkpoint per epoch with its
``optimizer.pt``, every step's learning rate logged), so the trajectory, Adam's second moments
included, is read back from the Trainer's output directory with ``trainer_trajectory``: what a
user who fine-tuned with the Trainer would do. Needs the
``hf`` extra (``pip install source-proj[hf]``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from source_proj.trajectory.checkpoints import Trajectory

if TYPE_CHECKING:  # imported when the demo runs (an optional dependency)
    import datasets

HOLD_OUT = 10


@dataclass(frozen=True)
class LMDemoSettings:
    """The demo's corpus, model and training.

    Attributes:
        length: characters per sequence.
        topics: how many ``pydoc_data`` topics (alphabetical) make the corpus.
        width, layers, heads: GPT-2 size (``n_embd``, ``n_layer``, ``n_head``).
        epochs, batch_size, lr, warmup_ratio, weight_decay: the Trainer's run with its default
            optimizer, AdamW (and its default decay, none), linear decay of the learning rate
            after warm-up, one checkpoint per epoch.
        seed: model initialisation and batch order.
    """

    length: int = 48
    topics: int = 5
    width: int = 48
    layers: int = 2
    heads: int = 4
    epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class LMRun:
    """A trained character-level GPT-2 with its trajectory and data (``datasets.Dataset``
    with ``input_ids`` and ``text`` columns)."""

    model: nn.Module
    trajectory: Trajectory
    train: datasets.Dataset
    queries: datasets.Dataset
    vocabulary: str


def lm_corpus(settings: LMDemoSettings = LMDemoSettings()) -> tuple[list[str], list[str], str]:
    """(training windows, held-out windows, vocabulary) from CPython's bundled docs."""
    from pydoc_data.topics import topics

    train: list[str] = []
    held: list[str] = []
    for name in sorted(topics)[: settings.topics]:
        text = re.sub(r"\s+", " ", topics[name]).strip()
        text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
        windows = [text[i : i + settings.length] for i in range(0, len(text) - settings.length + 1, settings.length)]
        for j, window in enumerate(windows):
            (held if j % HOLD_OUT == HOLD_OUT - 1 else train).append(window)
    vocabulary = "".join(sorted(set("".join(train + held))))
    return train, held, vocabulary


def _dataset(texts: list[str], vocabulary: str):
    import datasets

    index = {c: i for i, c in enumerate(vocabulary)}
    ids = [[index[c] for c in t] for t in texts]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "text": texts})


def lm_model(vocab_size: int, settings: LMDemoSettings) -> nn.Module:
    """A GPT-2 LM (tied head, no dropout, eager attention so that vmap can batch it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=settings.length, n_embd=settings.width, n_layer=settings.layers,
        n_head=settings.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager",  # type: ignore[call-arg]  # a PretrainedConfig keyword
    )
    torch.manual_seed(settings.seed)
    return GPT2LMHeadModel(config)


def lm_run(output_dir: str | os.PathLike, settings: LMDemoSettings = LMDemoSettings()) -> LMRun:
    """Train the demo model with ``transformers.Trainer`` into ``output_dir`` (reused when a
    finished run is there) and read its trajectory back from the checkpoint folders."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError("the language-model demo needs the hf extra: pip install 'source-proj[hf]'") from exc
    from source_proj.trajectory.hf_trainer import trainer_trajectory

    train_texts, query_texts, vocabulary = lm_corpus(settings)
    train, queries = _dataset(train_texts, vocabulary), _dataset(query_texts, vocabulary)
    model = lm_model(len(vocabulary), settings)
    folder = Path(output_dir)
    steps = settings.epochs * -(-len(train_texts) // settings.batch_size)
    if not (folder / f"checkpoint-{steps}").is_dir():
        transformers.logging.set_verbosity_error()
        args = transformers.TrainingArguments(
            output_dir=str(folder), num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr, optim="adamw_torch", warmup_steps=round(settings.warmup_ratio * steps),
            weight_decay=settings.weight_decay, lr_scheduler_type="linear", save_strategy="epoch", logging_steps=1,
            report_to=[], use_cpu=True, disable_tqdm=True, seed=settings.seed, data_seed=settings.seed, dataloader_num_workers=0,
        )
        transformers.Trainer(model=model, args=args, train_dataset=train.remove_columns("text")).train()
    trajectory = trainer_trajectory(folder, model=model)
    model.load_state_dict(trajectory.checkpoints[-1].load(), strict=False)  # the tied head is the embedding
    return LMRun(model.eval(), trajectory, train, queries, vocabulary)


def run_lm_demo(workdir: str | os.PathLike = "source-proj-demo-lm", num_queries: int = 4, top: int = 3,
                proj_dim: int = 256, curvature_examples: int = 128,
                settings: LMDemoSettings = LMDemoSettings(), progress: bool = True,
                device: str | None = None) -> torch.Tensor:
    """Train (or reuse) the demo model under ``workdir``, run SOURCE on its training
    sequences and print, for ``num_queries`` held-out sequences, the training sequences
    whose inclusion most raised (proponents) and lowered (opponents) their log-probability.
    The Hessians use ``curvature_examples`` training sequences per checkpoint; ``progress``
    and ``device`` are the attributor's run-time settings. Returns the scores, (queries,
    training sequences)."""
    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask

    print(f"Training a character-level GPT-2 on CPython's bundled docs (transformers.Trainer, AdamW); "
          f"checkpoints in {workdir}/")
    run = lm_run(Path(workdir) / "trainer", settings)
    # The Trainer averaged the token cross-entropy over a batch; all sequences have the same
    # number of target tokens, so the per-sequence loss is the mean over its tokens.
    task = CausalLMTask(reduction="mean")
    queries = run.queries.select(range(min(num_queries, len(run.queries))))
    with torch.no_grad():
        ids = torch.tensor(queries["input_ids"])
        loss = task.loss(run.model(input_ids=ids).logits, ids).mean().item()
    p = sum(q.numel() for q in run.model.parameters())
    print(f"  {len(run.train)} training sequences of {settings.length} characters, {p:,} parameters, "
          f"{len(run.trajectory.checkpoints)} checkpoints; held-out loss {loss:.3f} nats/character")
    attributor = SourceAttributor(run.model, task, run.trajectory, proj_dim=proj_dim, seed=0,
                                  curvature_examples=curvature_examples, progress=progress, device=device)
    print(f"SOURCE: {attributor.num_segments} segments, k={proj_dim}, {attributor.curvature} curvature "
          f"({curvature_examples} sequences per checkpoint)")
    attributor.fit(run.train)
    scores = attributor.score(queries)
    for q in range(scores.shape[0]):
        print(f"\nHeld-out sequence #{q}: {queries[q]['text']!r}")
        for name, order in (("proponents", scores[q].argsort(descending=True)), ("opponents", scores[q].argsort())):
            print(f"  top {name} (score = predicted change of its log-probability):")
            for m in order[:top].tolist():
                print(f"    {float(scores[q, m]):+.4f}  #{m}: {run.train[m]['text']!r}")
    return scores
