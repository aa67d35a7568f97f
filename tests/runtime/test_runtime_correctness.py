"""The runtime computes what the plan says: greedy tokens equal the reference executor's (full
recompute, Hugging Face modules), the empty plan equals Hugging Face `generate`, float16 logits
stay close, and batching never changes a sequence's tokens."""
import pytest
import torch
from compress_settings import settings

from subfit.models import Decoder, load
from subfit.plan import Plan
from subfit.reference import ReferenceModel
from subfit.runtime import Runtime

NEW = 24


def prompt_ids(n: int, seed: int) -> torch.Tensor:
    ids = torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 1  # BOS
    return ids


@pytest.mark.parametrize("shape", ["empty", "p25", "p375"])
@pytest.mark.parametrize("model_name", ["stories260K", "llama", "qwen2", "qwen3", "mistral", "llama3-rope"])
def test_greedy_tokens_equal_reference(model_name, shape, stories, family, plan_of):
    model, tokenizer, source = stories if model_name == "stories260K" else family(model_name)
    plan = plan_of(model, source, shape)
    runtime = Runtime.from_hf(model, plan, tokenizer, max_seq_len=64)
    reference = ReferenceModel(model, plan)
    for seed, n in ((0, 7), (1, 1)):
        ids = prompt_ids(n, seed)
        assert runtime.generate(ids[0], NEW, eos=[]).ids == reference.greedy(ids, NEW)[0].tolist()
    ids = prompt_ids(40, 2)  # logits too: tight enough to catch RoPE without llama3 scaling (error ~2e-3)
    assert torch.allclose(runtime.prefill(ids), reference(ids)[:, -1], atol=1e-4, rtol=1e-4)


def test_stories_reads_like_the_story(stories):
    model, tokenizer, _ = stories
    out = Runtime.from_hf(model, None, tokenizer).generate([1], 20)
    assert out.text.startswith("Once upon a time, there was a little girl named Lily.")


@pytest.mark.parametrize("model_name", ["stories260K", "qwen2"])
def test_empty_plan_equals_hf_generate(model_name, stories, family):
    """Through the drop-in wrapper, on a left-padded batch, as existing Hugging Face code calls it."""
    model, tokenizer, source = stories if model_name == "stories260K" else family(model_name)
    hf = Runtime.from_hf(model, None, tokenizer).as_hf()
    a, b = prompt_ids(9, 3)[0], prompt_ids(4, 4)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(9, dtype=torch.long), torch.cat([torch.zeros(5), torch.ones(4)]).long()])
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(hf.generate(input_ids=ids, attention_mask=mask, **kwargs), expected)
    single = model.generate(input_ids=a[None], **kwargs)
    assert torch.equal(hf.generate(a[None], **kwargs), single)


@pytest.mark.parametrize("shape", ["empty", "p375"])
@pytest.mark.parametrize("model_name", ["stories260K", "qwen3"])
def test_float16_logits_close_to_reference(model_name, shape, stories_dir, family_dir, plan_of):
    """Prefill and decode-step logits in float16 against the float32 reference on the same tokens."""
    folder = stories_dir if model_name == "stories260K" else family_dir(model_name)
    model32, _, source = load(folder)
    model16, _, _ = load(folder, dtype=torch.float16)
    plan = plan_of(model32, source, shape)
    runtime = Runtime.from_hf(model16, plan, max_seq_len=64)
    ids = prompt_ids(12, 5)
    expected = ReferenceModel(model32, plan)(ids)[0]
    got = [runtime.prefill(ids[:, :6])[0]] + [runtime.decode_step(ids[:, t])[0] for t in range(6, 12)]
    got = torch.stack(got)
    assert got.dtype == torch.float32
    err = (got - expected[5:]).norm() / expected[5:].norm()
    assert err < 1e-2, f"float16 relative logit error {err:.2e}"
    assert (got.argmax(-1) == expected[5:].argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("shape", ["empty", "p25"])
@pytest.mark.parametrize("model_name", ["stories260K", "qwen2"])
def test_batch_equals_each_prompt_alone(model_name, shape, stories, family, plan_of):
    model, tokenizer, source = stories if model_name == "stories260K" else family(model_name)
    runtime = Runtime.from_hf(model, plan_of(model, source, shape), tokenizer, max_seq_len=64)
    prompts = [prompt_ids(n, seed)[0].tolist() for n, seed in ((11, 6), (3, 7), (7, 8))]
    batch = runtime.generate(prompts, NEW, eos=[]).ids
    alone = [runtime.generate(p, NEW, eos=[]).ids for p in prompts]
    assert batch == alone
    padded = torch.zeros(3, 11, dtype=torch.long)  # the tensor form: right-padded, with lengths
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    logits = runtime.prefill(padded, lengths=[11, 3, 7])
    for i, p in enumerate(prompts):
        assert torch.allclose(logits[i], runtime.prefill([p])[0], atol=1e-5)
    # EOS stops one sequence early without disturbing the others.
    eos = alone[1][5]
    stopped = runtime.generate(prompts, NEW, eos=eos).ids
    for got, full in zip(stopped, alone):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert got == full[:cut]


def test_every_attention_removed(stories, build_plan):
    """No slots at all: an empty cache, and still exactly the reference."""
    model, tokenizer, source = stories
    n = Decoder(model).num_layers
    plan = build_plan(model, source, {i: ("bypass" if i % 2 else "delete") for i in range(n)}, {2: "bypass"})
    runtime = Runtime.from_hf(model, plan, tokenizer, max_seq_len=64)
    assert runtime.kv_cache_bytes() == 0
    ids = prompt_ids(5, 9)
    assert runtime.generate(ids, NEW, eos=[]).ids == ReferenceModel(model, plan).greedy(ids, NEW).tolist()


def test_prefill_and_decode_step_by_hand(stories, plan_of):
    model, _, source = stories
    plan = plan_of(model, source, "p25")
    runtime = Runtime.from_hf(model, plan, max_seq_len=64)
    ids = prompt_ids(6, 10)
    reference = ReferenceModel(model, plan)
    logits = runtime.prefill(ids)
    assert torch.allclose(logits, reference(ids)[:, -1], atol=1e-4)
    token = logits.argmax(-1)
    logits = runtime.decode_step(token)
    assert torch.allclose(logits, reference(torch.cat([ids, token[:, None]], 1))[:, -1], atol=1e-4)


def test_real_compressed_plan(stories, stories_dir, tmp_path):
    """A plan from `subfit.compress` (not hand-built), saved and loaded back, runs like the reference."""
    compress = pytest.importorskip("subfit.compression").compress
    text = stories_dir.parent.parent / "data" / "tinystories" / "tinystories_validation_head.txt"
    if not text.exists():
        pytest.skip(f"asset {text} not found: set SUBFIT_ASSETS to the shared assets folder")
    model, tokenizer, _ = stories
    calib = torch.tensor(tokenizer(text.read_text()[:30_000]).input_ids[: 16 * 64]).view(16, 64)
    plan = compress(model, 0.375, calib, **settings(step=0.75, score_samples=4, selection_draws=1))
    assert plan.removed_units()
    plan.save(tmp_path / "plan")
    runtime = Runtime.from_hf(model, Plan.load(tmp_path / "plan"), tokenizer, max_seq_len=64)
    ids = prompt_ids(6, 11)
    assert runtime.generate(ids[0], NEW, eos=[]).ids == ReferenceModel(model, plan).greedy(ids, NEW)[0].tolist()
