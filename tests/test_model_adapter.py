"""Models as users write them: keyword inputs, ModelOutput/dict/tuple outputs, tied weights
and Hugging Face checkpoint files, dict rows from datasets and collators, parameter
patterns, the memory budget, and models that cannot run under vmap."""

import warnings

import pytest
import torch
from lm_helpers import as_columns, random_rows, tiny_gpt2, train_lm
from tiny_models import trained_classifier
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.gradients.data import as_examples
from source_proj.gradients.memory import DEFAULT_MAX_CHUNK, MemoryBudgetError, parse_bytes
from source_proj.gradients.model import select_output, select_parameters
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError

transformers = pytest.importorskip("transformers")


class Keyword(nn.Module):
    """The digits-style MLP behind a keyword forward returning a chosen output container."""

    def __init__(self, inner: nn.Module, form: str):
        super().__init__()
        self.inner, self.form = inner, form

    def forward(self, x=None, unused=None):
        logits = self.inner(x)
        if self.form == "dict":
            return {"hidden": x, "logits": logits}
        if self.form == "tuple":
            return (logits, x)
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)


def test_keyword_inputs_and_output_containers_give_the_plain_models_scores():
    model, traj, (x, y) = trained_classifier()
    kw = dict(proj_dim=16, progress=False)
    ref = SourceAttributor(model, "classification", traj, **kw).fit((x, y)).score((x[:5], y[:5]))
    for form in ("dict", "tuple", "model_output"):
        wrapped = Keyword(model, form)
        wtraj = Trajectory(
            tuple(Checkpoint({f"inner.{k}": v for k, v in c.load().items()}, c.steps, c.lr) for c in traj.checkpoints),
            optimizer=traj.optimizer, momentum=traj.momentum, weight_decay=traj.weight_decay,
        )
        # dict rows with a "label" column and a column the forward does not take (dropped)
        rows = {"x": x, "label": y, "row_id": torch.arange(len(y))}
        queries = {"x": x[:5], "label": y[:5], "row_id": torch.arange(5)}
        att = SourceAttributor(wrapped, "classification", wtraj, **kw).fit(rows)
        torch.testing.assert_close(att.score(queries), ref, rtol=1e-5, atol=1e-7)
    chosen = SourceAttributor(Keyword(model, "dict"), "classification", wtraj, output=lambda o: o["logits"], **kw)
    torch.testing.assert_close(chosen.fit(rows).score(queries), ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(KeyError, match="has no 'scores' entry; it has \\['hidden', 'logits'\\]"):
        select_output({"hidden": x, "logits": x}, "scores")
    with pytest.raises(TypeError, match="not a tensor"):
        select_output((None,))


def test_tied_head_checkpoints_load_without_rekeying_with_the_tied_key_present_or_absent(tmp_path):
    from safetensors.torch import save_file

    model = tiny_gpt2()
    rows = random_rows(6, 10, (3, 6), seed=5)
    traj = train_lm(model, rows, epochs=2)
    states = [c.load() for c in traj.checkpoints]
    assert "lm_head.weight" in states[0]  # state_dict() lists the tied key too
    kw = dict(proj_dim=24, num_segments=2, progress=False)
    ref = SourceAttributor(model, "causal_lm", traj, **kw).fit(as_columns(rows))
    forms = {}
    for name in ("bin", "safetensors", "pretrained"):
        paths = []
        for i, state in enumerate(states):
            folder = tmp_path / f"{name}-{i}"
            folder.mkdir()
            if name == "bin":  # torch.save of the state dict: the tied key present
                torch.save(state, folder / "pytorch_model.bin")
            elif name == "safetensors":  # safetensors cannot hold shared tensors: tied key absent
                save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                          str(folder / "model.safetensors"))
            else:
                model.load_state_dict(state)
                model.save_pretrained(folder)
            paths.append(folder if name == "pretrained" else next(folder.iterdir()))
        forms[name] = Trajectory(tuple(Checkpoint(p, c.steps, c.lr) for p, c in zip(paths, traj.checkpoints)),
                                 weight_decay=traj.weight_decay)
    for name, ftraj in forms.items():
        att = SourceAttributor(model, "causal_lm", ftraj, **kw)
        assert att.checkpoint_digests == ref.checkpoint_digests, name
        torch.testing.assert_close(att.fit(as_columns(rows)).train_features, ref.train_features)
    # Two names of one tied tensor holding different values: refused, naming both.
    bad = dict(states[0])
    bad["lm_head.weight"] = bad["lm_head.weight"] + 1.0
    with pytest.raises(TrajectoryError, match="'lm_head.weight' and 'transformer.wte.weight' are tied"):
        SourceAttributor(model, "causal_lm", Trajectory((Checkpoint(bad, 1, 0.1),)), **{**kw, "num_segments": 1})
    with pytest.raises(TrajectoryError, match="holds none of the weight files"):
        Checkpoint(tmp_path, 1, 0.1).load()


def test_dict_rows_from_datasets_torch_datasets_and_collators_equal_padded_tensors():
    import datasets
    from transformers import DataCollatorForLanguageModeling

    model = tiny_gpt2()
    rows = random_rows(7, 10, (3, 7), seed=6, masked=False)
    for r in rows:  # no token 0: the collator takes every pad-id token (0) for padding
        r["input_ids"] = [t % 9 + 1 for t in r["input_ids"]]
    traj = train_lm(model, rows, epochs=2)
    kw = dict(proj_dim=24, num_segments=2, progress=False, chunk_size=3)
    columns = {"input_ids": [r["input_ids"] for r in rows]}
    ref = SourceAttributor(model, "causal_lm", traj, **kw).fit(columns).train_features

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(rows[i]["input_ids"]), "text": f"row {i}"}

    class Tokenizer:  # what the collator needs of a tokenizer: padding of input_ids
        pad_token_id = 0
        padding_side = "right"

        def pad(self, features, return_tensors="pt", **_):
            ids = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(f["input_ids"]) for f in features],
                                                  batch_first=True)
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
            return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})

    collator = DataCollatorForLanguageModeling(Tokenizer(), mlm=False)
    sources = {
        "datasets.Dataset": datasets.Dataset.from_dict({**columns, "text": [str(i) for i in range(7)]}),
        "torch Dataset of dicts": Rows(),
        "DataLoader with a collator": torch.utils.data.DataLoader(
            [{"input_ids": r["input_ids"]} for r in rows], batch_size=3, collate_fn=collator),
    }
    for name, data in sources.items():
        got = SourceAttributor(model, "causal_lm", traj, **kw).fit(data).train_features
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=name)
    inputs, targets = as_examples(sources["torch Dataset of dicts"]).rows(0, 3)
    assert sorted(inputs) == ["attention_mask", "input_ids"]  # text dropped, mask added
    assert (targets[inputs["attention_mask"] == 0] == -100).all()
    with pytest.raises(ValueError, match="no target column"):
        as_examples({"pixels": torch.zeros(3, 2)}).rows(0, 2)


def test_sequence_classification_outputs_work_with_the_classification_task():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=10, n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=3,
                        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="eager")
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    ids = torch.randint(1, 10, (12, 6))
    mask = torch.ones_like(ids)
    ids[::3, 4:], mask[::3, 4:] = 0, 0
    labels = torch.randint(0, 3, (12,))
    traj = Trajectory(tuple(Checkpoint({k: v + 0.01 * i for k, v in model.state_dict().items()}, 3, 0.1)
                            for i in range(2)))

    class Plain(nn.Module):  # the oracle: the same network behind a tensor-in, logits-out forward
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, ids, mask):
            return self.net(input_ids=ids, attention_mask=mask).logits

    ptraj = Trajectory(tuple(Checkpoint({f"net.{k}": v for k, v in c.load().items()}, 3, 0.1) for c in traj.checkpoints))
    kw = dict(proj_dim=16, num_segments=1, progress=False)
    ref = SourceAttributor(Plain(), "classification", ptraj, **kw).fit(((ids, mask), labels)).score(((ids, mask), labels))
    got = SourceAttributor(model, "classification", traj, **kw)
    assert got.curvature == "exact"
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    torch.testing.assert_close(got.fit(data).score(data), ref, rtol=1e-5, atol=1e-7)


def test_models_that_cannot_run_under_vmap_are_differentiated_one_example_at_a_time():
    model = tiny_gpt2(attn="sdpa")  # SDPA mask creation branches on tensor values
    rows = random_rows(5, 10, (3, 6), seed=7)
    traj = train_lm(model, rows, epochs=2)
    kw = dict(proj_dim=24, num_segments=2, progress=False)
    task = CausalLMTask(reduction="sum")  # as train_lm trains
    with pytest.warns(RuntimeWarning, match="cannot run under torch.func.vmap"):
        looped = SourceAttributor(model, task, traj, **kw).fit(as_columns(rows)).train_features
    model.set_attn_implementation("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = SourceAttributor(model, task, traj, **kw).fit(as_columns(rows)).train_features
    torch.testing.assert_close(looped, batched, rtol=1e-5, atol=1e-7)


def test_parameter_patterns_select_modules_and_tied_tensors_by_any_name():
    model = tiny_gpt2(layers=2)
    mlp = select_parameters(model, ["transformer.h.*.mlp.*"])
    assert mlp == tuple(n for n, _ in model.named_parameters() if ".mlp." in n) and len(mlp) == 8
    assert select_parameters(model, ["lm_head"]) == ("transformer.wte.weight",)  # tied to the embedding
    assert select_parameters(model, ["transformer.h.1"]) == tuple(
        n for n, _ in model.named_parameters() if n.startswith("transformer.h.1."))
    with pytest.raises(ValueError, match="unknown parameter names or patterns \\['decoder.\\*'\\]"):
        select_parameters(model, ["decoder.*", "lm_head"])
    rows = random_rows(4, 10, (3, 5), seed=8)
    traj = train_lm(model, rows, epochs=2)
    kw = dict(proj_dim=16, num_segments=2, progress=False)
    by_pattern = SourceAttributor(model, "causal_lm", traj, param_names=["transformer.h.*.mlp.*", "lm_head"], **kw)
    by_name = SourceAttributor(model, "causal_lm", traj, param_names=[*mlp, "transformer.wte.weight"], **kw)
    assert by_pattern.model_fn.names == by_name.model_fn.names
    torch.testing.assert_close(by_pattern.fit(as_columns(rows)).train_features,
                               by_name.fit(as_columns(rows)).train_features)


def test_memory_budget_chooses_chunks_splits_curvature_and_refuses_before_work():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("1.5 MB") == 1_500_000 and parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="cannot read the memory size"):
        parse_bytes("4 parsecs")
    model, traj, (x, y) = trained_classifier()  # p = 51: 408 bytes per row of features
    p = 51
    kw = dict(proj_dim=8, progress=False)
    assert SourceAttributor(model, "classification", traj, **kw).chunk_size == DEFAULT_MAX_CHUNK
    assert SourceAttributor(model, "classification", traj, max_gradient_memory=10 * 8 * p, **kw).chunk_size == 10
    with pytest.raises(MemoryBudgetError, match="chunk_size=32 needs 13,056 bytes"):
        SourceAttributor(model, "classification", traj, chunk_size=32, max_gradient_memory=10_000, **kw)
    with pytest.raises(MemoryBudgetError, match="one example's per-example gradients need 408 bytes"):
        SourceAttributor(model, "classification", traj, max_gradient_memory=400, **kw)
    # Exact curvature: C = 3 factor rows of p floats plus the factor per example, 4 * 51 * 3 + 3 * 3 * 8
    # = 684 bytes: a budget of 2 examples' worth splits each chunk into backward batches of two.
    ref = SourceAttributor(model, "classification", traj, **kw).checkpoint_hessian(0, as_examples((x, y)))
    split = SourceAttributor(model, "classification", traj, chunk_size=1, max_gradient_memory=2 * 684, **kw)
    split.chunk_size = 16  # the feature chunk would not fit; the curvature pass splits its own
    torch.testing.assert_close(split.checkpoint_hessian(0, as_examples((x, y))), ref, rtol=1e-6, atol=1e-9)
    tight = SourceAttributor(model, "classification", traj, chunk_size=1, max_gradient_memory=500, **kw)
    with pytest.raises(MemoryBudgetError, match="curvature='sampled'"):
        tight.checkpoint_hessian(0, as_examples((x, y)))
