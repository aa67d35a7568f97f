"""A seeded fuzzer over a real stories260K plan: whatever is done to plan.json or
bypass.safetensors (bytes, field values and types, tensor names, shapes, dtypes, values), loading
either gives a plan that runs to finite logits, or raises PlanError naming the plan's files.
Nothing else may escape: no KeyError, TypeError, UnicodeDecodeError, shape error at run time."""
import copy
import json
import random

import pytest
import torch
from safetensors.torch import save_file

from subfit.plan import Plan, PlanError
from subfit.reference import ReferenceModel

SEED = 0
ROUNDS = 1000
PROMPT = torch.tensor([[1, 9, 33, 7, 100, 2]])
# Replacement values for JSON fields: every JSON type, edge numbers, and valid-looking strings.
VALUES = [None, True, False, 0, -1, 1, 2, 8, 7.5, -0.0, 1e308, 10**30, float("nan"), float("inf"), "", "x",
          "keep", "bypass", "delete", "1", [], [1], [None, "keep"], {}, {"attn": 1}]
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float64, torch.float8_e4m3fn]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -7e4, 7e4, 6e4, 0.0, 1e-40]


@pytest.fixture(scope="module")
def original(small_plan, tmp_path_factory):
    """The real plan's parsed plan.json and tensors, as saved."""
    from safetensors.torch import load_file

    folder = small_plan.save(tmp_path_factory.mktemp("fuzz") / "plan")
    return json.loads((folder / "plan.json").read_text()), load_file(str(folder / "bypass.safetensors"))


def _paths(node, prefix=()):
    """Every path (tuple of keys and indices) into a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _parent(meta, path):
    node = meta
    for key in path[:-1]:
        node = node[key]
    return node


def _tweaked(rng, value):
    """A value near the old one (same type where possible), or one of VALUES."""
    if isinstance(value, bool) or rng.random() < 0.5:
        return rng.choice(VALUES)
    if isinstance(value, (int, float)):
        return rng.choice([value + 1, value - 1, value * 2, -value, value / 3])
    if isinstance(value, str):
        return value[:-1] if value and rng.random() < 0.5 else value + rng.choice(["x", "0", " ", "\u00e9"])
    return rng.choice(VALUES)


def mutate_json(rng, meta, tensors):
    path = rng.choice([p for p in _paths(meta) if p])
    parent, key = _parent(meta, path), path[-1]
    action = rng.choice(["set", "set", "delete", "add"])
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "layer", "attn", "rank"])] = rng.choice(VALUES)
    elif action == "add":
        parent.append(copy.deepcopy(rng.choice(parent + [None])))
    else:
        parent[key] = _tweaked(rng, parent[key])
    return f"json {action} {list(path)}"


def mutate_name(rng, meta, tensors):
    name = rng.choice(sorted(tensors))
    action = rng.choice(["rename", "drop", "add", "swap-layer"])
    if action == "drop":
        del tensors[name]
    elif action == "add":
        tensors[rng.choice(["attn.0.up", "ffn.1.bias", "attn.2.down", "x", "ffn.basis2"])] = tensors[name].clone()
    elif action == "swap-layer":
        kind, _, part = name.partition(".")
        tensors[f"{kind}.{rng.randrange(6)}.{part.partition('.')[2] or 'up'}"] = tensors.pop(name)
    else:
        tensors[name + rng.choice(["x", "_", ".0"])] = tensors.pop(name)
    return f"tensor {action} {name}"


def mutate_shape(rng, meta, tensors):
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    options = {
        "transpose": lambda: t.T if t.dim() == 2 else t[None],
        "drop-last": lambda: t[..., :-1],
        "pad": lambda: torch.cat([t, torch.zeros_like(t[..., :1])], dim=-1),
        "unsqueeze": lambda: t[None],
        "flatten": lambda: t.reshape(-1),
        "empty": lambda: t[:0],
        "scalar": lambda: t.reshape(-1)[0],
    }
    if not t.numel():
        del options["scalar"]
    action = rng.choice(sorted(options)) if t.dim() else "unsqueeze"
    tensors[name] = options[action]().contiguous()
    return f"shape {action} {name}"


def mutate_dtype(rng, meta, tensors):
    name = rng.choice(sorted(tensors))
    dtype = rng.choice(DTYPES)
    tensors[name] = (tensors[name].float() * rng.choice([1, 100])).to(dtype)
    return f"dtype {dtype} {name}"


def mutate_values(rng, meta, tensors):
    name = rng.choice(sorted(tensors))
    t = tensors[name].to(torch.float32, copy=True)
    if not t.numel():
        return f"values (none to change) {name}"
    if rng.random() < 0.3:
        scale = rng.choice([0.0, -1.0, 1e3, 1e5])
        tensors[name] = t * scale
        return f"values x{scale} {name}"
    flat = t.view(-1)
    for _ in range(rng.randint(1, 3)):
        flat[rng.randrange(flat.numel())] = rng.choice(SPECIAL)
    tensors[name] = t
    return f"values special {name}"


def _mutate_bytes(rng, data: bytes) -> tuple[bytes, str]:
    data = bytearray(data)
    action = rng.choice(["flip", "flip", "insert", "delete", "truncate", "header"])
    at = rng.randrange(len(data))
    if action == "header":  # the start: plan.json's first field, or safetensors' header length and JSON
        at = rng.randrange(min(len(data), 64))
    if action in ("flip", "header"):
        data[at] ^= 1 << rng.randrange(8)
    elif action == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    elif action == "delete":
        del data[at:at + rng.randint(1, 4)]
    else:
        del data[at:]
    return bytes(data), f"{action} at byte {at}"


STRUCTURED = [mutate_json, mutate_json, mutate_name, mutate_shape, mutate_dtype, mutate_values, mutate_values]


def fuzz(original: tuple[dict, dict], model, root, seed: int, rounds: int) -> dict[str, int]:
    """Mutate the plan `rounds` times, load each result from a folder under `root`, and run what
    loads; fail on anything but a loaded plan with finite logits or a PlanError. Returns the counts
    of outcomes."""
    rng = random.Random(seed)
    outcomes = {"ran": 0, "refused on load": 0, "refused when applied": 0}
    for round_ in range(rounds):
        meta, tensors = copy.deepcopy(original[0]), {k: v.clone() for k, v in original[1].items()}
        done = [rng.choice(STRUCTURED)(rng, meta, tensors) for _ in range(rng.randint(0, 2))]
        folder = root / f"round{round_}"
        folder.mkdir()
        text = json.dumps(meta).encode()
        save_file(tensors, str(folder / "bypass.safetensors"))
        weights = (folder / "bypass.safetensors").read_bytes()
        if not done or rng.random() < 0.3:
            if rng.random() < 0.5:
                text, what = _mutate_bytes(rng, text)
                done.append(f"plan.json bytes: {what}")
            else:
                weights, what = _mutate_bytes(rng, weights)
                done.append(f"bypass.safetensors bytes: {what}")
        (folder / "plan.json").write_bytes(text)
        (folder / "bypass.safetensors").write_bytes(weights)
        where = f"round {round_} (seed {seed}): {'; '.join(done)}"
        try:
            plan = Plan.load(folder)
        except PlanError as e:
            assert str(folder) in str(e), f"{where}: the error does not name the plan's file: {e}"
            assert "\n" not in str(e), f"{where}: the error is not one line: {e}"
            outcomes["refused on load"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
            pytest.fail(f"{where}: Plan.load raised {type(e).__name__}: {e}")
        try:
            logits = ReferenceModel(model, plan)(PROMPT)
        except PlanError:
            outcomes["refused when applied"] += 1  # e.g. an edited fingerprint or weight signature
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{where}: the loaded plan fails to run: {type(e).__name__}: {e}")
        assert torch.isfinite(logits).all(), f"{where}: the loaded plan gives non-finite logits"
        outcomes["ran"] += 1
    return outcomes


def test_fuzzed_plans_load_and_run_or_raise_plan_error(original, stories, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    try:
        outcomes = fuzz(original, stories[0], tmp_path, SEED, ROUNDS)
    finally:
        torch.set_num_threads(threads)
    # The fuzzer must exercise both sides: plans that survive a mutation and plans that are refused.
    assert outcomes["ran"] >= ROUNDS // 10 and outcomes["refused on load"] >= ROUNDS // 3, outcomes
