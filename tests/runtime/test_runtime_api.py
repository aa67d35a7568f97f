"""The public surface: load() from plan directories and models, generate/stream, sampling, the
Hugging Face drop-in, and the one-way data flow (no compression imports)."""
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from subfit.models import Decoder
from subfit.plan import Plan
from subfit.reference import ReferenceModel
from subfit.runtime import Generation, Runtime, load, sample


def test_load_plan_directory_and_moved_base(stories, stories_dir, plan_of, tmp_path):
    model, _, source = stories
    plan = plan_of(model, source, "p25")
    plan.save(tmp_path / "plan")
    runtime = load(tmp_path / "plan", device="cpu", dtype="float32")
    expected = ReferenceModel(model, plan).greedy(torch.tensor([[1, 9, 33]]), 12)[0].tolist()
    assert runtime.generate([1, 9, 33], 12, eos=[]).ids == expected
    assert runtime.dtype == torch.float32 and runtime.kv_cache_bytes() > 0
    moved = tmp_path / "moved-model"
    shutil.copytree(stories_dir, moved)
    plan.base["path"] = str(tmp_path / "gone")
    plan.save(tmp_path / "plan-moved")
    with pytest.raises(FileNotFoundError, match="not there any more"):
        load(tmp_path / "plan-moved")
    moved_runtime = load(tmp_path / "plan-moved", base=moved, device="cpu", dtype="float32")
    assert moved_runtime.generate([1, 9, 33], 12, eos=[]).ids == expected


def test_load_model_means_empty_plan(stories_dir, stories):
    runtime = load(stories_dir, device="cpu", dtype="float32")
    assert runtime.plan.removed_units() == []
    model, _, _ = stories
    ids = torch.tensor([[1, 70, 80]])
    assert runtime.generate(ids[0], 10, eos=[]).ids == ReferenceModel(model).greedy(ids, 10)[0].tolist()


def test_prompt_forms(stories):
    model, tokenizer, _ = stories
    runtime = Runtime.from_hf(model, None, tokenizer)
    text = runtime.generate("Once upon a time", 12)
    assert isinstance(text, Generation) and isinstance(text.text, str) and isinstance(text.ids[0], int)
    ids = tokenizer("Once upon a time").input_ids
    assert runtime.generate(ids, 12).ids == text.ids
    assert runtime.generate(torch.tensor(ids), 12).ids == text.ids
    batch = runtime.generate(["Once upon a time", "The cat"], 12)
    assert batch.ids[0] == text.ids and batch.text[0] == text.text and len(batch.text) == 2
    assert runtime.generate(torch.tensor([ids]), 12).ids == [text.ids]
    assert text.text.startswith(", there was")  # the leading space/punctuation survives decoding


def test_stream_text_adds_up_to_generate(stories):
    model, tokenizer, _ = stories
    runtime = Runtime.from_hf(model, None, tokenizer)
    prompts = ["Once upon a time", "Lily and Ben"]
    steps = list(runtime.stream(prompts, 30, temperature=0.8, seed=3))
    streamed = ["".join(step.text[b] for step in steps) for b in range(2)]
    ids = [[step.ids[b] for step in steps if step.ids[b] is not None] for b in range(2)]
    out = runtime.generate(prompts, 30, temperature=0.8, seed=3)
    assert out.ids == ids and out.text == streamed


def test_eos_stops_and_is_kept(stories):
    model, tokenizer, _ = stories
    runtime = Runtime.from_hf(model, None, tokenizer)
    assert runtime.eos == [2]  # from the model's generation config
    free = runtime.generate([1], 40, eos=[]).ids
    stop = free[12]
    assert runtime.generate([1], 40, eos=stop).ids == free[: free.index(stop) + 1]
    assert runtime.generate([1], 40, eos=[stop, 999]).ids == free[: free.index(stop) + 1]


def test_sampling(stories):
    model, tokenizer, _ = stories
    runtime = Runtime.from_hf(model, None, tokenizer)
    greedy = runtime.generate([1], 30, eos=[]).ids
    a = runtime.generate([1], 30, temperature=1.0, seed=7, eos=[]).ids
    assert a == runtime.generate([1], 30, temperature=1.0, seed=7, eos=[]).ids
    assert a != runtime.generate([1], 30, temperature=1.0, seed=8, eos=[]).ids
    assert runtime.generate([1], 30, temperature=1.5, top_k=1, seed=1, eos=[]).ids == greedy
    assert runtime.generate([1], 30, temperature=1.5, top_p=1e-6, seed=1, eos=[]).ids == greedy


def test_sample_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two
    assert int(sample(logits)) == 0


def test_sample_frequencies_follow_the_distribution():
    """Temperature-1 draws over many rows at once: each token's frequency is its probability within
    4 standard errors, and tokens of probability 0 (first, middle, last) never come up."""
    probs = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2, 0.1, 0.05, 0.0])
    rows = 20_000
    logits = probs.log().expand(rows, -1)
    tokens = sample(logits, 1.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * rows
    assert (counts[probs == 0] == 0).all()
    assert ((counts - expected).abs() <= 4 * (expected * (1 - probs.double())).sqrt()).all()


def test_hf_dropin_pads_finished_sequences(stories):
    model, tokenizer, _ = stories
    hf = Runtime.from_hf(model, None, tokenizer).as_hf()
    ids = torch.tensor([[1, 70, 80, 90], [0, 0, 1, 70]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=300, pad_token_id=0)
    assert torch.equal(out[:, :4], ids)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=300, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
    sampled = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5)
    assert sampled.shape[0] == 2 and 4 < sampled.shape[1] <= 12


def test_runtime_never_imports_compression():
    code = textwrap.dedent("""
        import sys, torch
        import subfit.runtime
        from subfit.runtime import cli
        from subfit.runtime.bench import synthetic_plan
        banned = [m for m in ("calibration", "stats", "fitting", "selection", "compression", "evaluation")
                  if "subfit." + m in sys.modules]
        assert not banned, f"importing the runtime pulled in subfit.{banned}: see subfit/__init__.py"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_runtime_never_imports_compression_while_loading(stories_dir, tmp_path, stories):
    model, _, source = stories
    Plan.empty(Decoder(model), source).save(tmp_path / "plan")
    code = textwrap.dedent(f"""
        import sys
        from subfit.runtime import load
        load({str(tmp_path / 'plan')!r}).generate([1], 3)
        banned = [m for m in ("calibration", "stats", "fitting", "selection", "compression", "evaluation")
                  if "subfit." + m in sys.modules]
        assert not banned, f"loading a plan pulled in subfit.{{banned}}"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
