"""A Hugging Face ``Trainer`` language model, attributed with ``trainer_trajectory``.

A tiny character-level GPT-2 is built from a ``GPT2Config`` (nothing downloaded) and trained
by ``transformers.Trainer`` (AdamW, its default) on sequences of three kinds: letters, digits
and punctuation patterns. SOURCE reads the run back from the Trainer's ``checkpoint-*/``
folders (weights, learning rates, AdamW states) and prints, for a few held-out sequences, the
training sequence that most raised their log-probability. Needs ``pip install '.[hf]'``.

    python examples/hf_trainer_lm.py [OUTPUT_DIR]
    SOURCE_EXAMPLE_TINY=1 python examples/hf_trainer_lm.py      # seconds
"""

import os
import random
import sys
import tempfile

import datasets
import torch
import transformers

from source_proj import CausalLMTask, SourceAttributor, trainer_trajectory

TINY = os.environ.get("SOURCE_EXAMPLE_TINY") == "1"
PER_KIND, LENGTH, EPOCHS, WIDTH = (12, 16, 3, 16) if TINY else (60, 32, 4, 32)
ALPHABETS = {"letters": "abcdefgh", "digits": "0123456789", "punctuation": ".,;:!?-"}
VOCABULARY = "".join(ALPHABETS.values())


def sequences(count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` random strings of each kind, and their kinds."""
    rng = random.Random(seed)
    texts, kinds = [], []
    for kind, alphabet in ALPHABETS.items():
        for _ in range(count):
            texts.append("".join(rng.choice(alphabet) for _ in range(LENGTH)))
            kinds.append(kind)
    return texts, kinds


def dataset(texts: list[str]) -> datasets.Dataset:
    """Character ids as ``input_ids`` and ``labels`` (the Trainer shifts them)."""
    ids = [[VOCABULARY.index(c) for c in t] for t in texts]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def train(output_dir: str) -> tuple[torch.nn.Module, datasets.Dataset, list[str]]:
    """Train the model with ``transformers.Trainer`` (unless ``output_dir`` holds a finished
    run); returns the model, its training rows and their kinds."""
    texts, kinds = sequences(PER_KIND, seed=0)
    config = transformers.GPT2Config(
        vocab_size=len(VOCABULARY), n_positions=LENGTH, n_embd=WIDTH, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",  # eager: vmap batches it
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=output_dir, num_train_epochs=EPOCHS, per_device_train_batch_size=8, learning_rate=3e-3,
        save_strategy="epoch", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    train_rows = dataset(texts)
    if not os.path.isfile(os.path.join(output_dir, "done")):
        transformers.Trainer(model=model, args=args, train_dataset=train_rows).train()
        open(os.path.join(output_dir, "done"), "w").close()
    return model, train_rows, kinds


def main() -> None:
    transformers.logging.set_verbosity_error()
    output_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    model, train_rows, kinds = train(output_dir)
    # Steps, learning rates and AdamW's second moments of every checkpoint-<step>/ folder.
    trajectory = trainer_trajectory(output_dir, model=model)
    model.load_state_dict(trajectory.checkpoints[-1].load(), strict=False)  # the tied head is the embedding

    # Equal-length sequences: the Trainer's batch-mean token loss is the per-sequence mean.
    attributor = SourceAttributor(model.eval(), CausalLMTask(reduction="mean"), trajectory,
                                  proj_dim=128 if TINY else 512, seed=0, progress=False)
    attributor.fit(train_rows)
    query_texts, query_kinds = sequences(1, seed=1)
    scores = attributor.score(dataset(query_texts))  # > 0: raised the query's log-probability
    for q, text in enumerate(query_texts):
        top = int(scores[q].argmax())
        print(f"query {q} ({query_kinds[q]}) {text!r}: top proponent #{top} ({kinds[top]}) "
              f"score {float(scores[q, top]):+.3e}")


if __name__ == "__main__":
    main()
