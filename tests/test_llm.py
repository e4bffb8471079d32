"""LLM decode on graphrt with transformers models and their own caches (random weights, tiny configs).

Greedy decode through graphrt.compile equals eager decode token for token (fp32 and bf16, B=1 and
batch buckets), capture leaves no trace in a StaticCache passed as an argument, a hybrid family
(LFM2: conv states + static attention) goes through the same path, a sliding-window layout is
refused with the reason, and misuse (wrong batch, past the cache, a swapped cache) is a clear error.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import graphrt  # noqa: E402
from graphrt.errors import RebindError  # noqa: E402
from graphrt.errors import CacheError, InputError, SignatureError  # noqa: E402
from graphrt.llm import LLMDecoder, greedy_eager  # noqa: E402

CACHE = 64           # one static length for graphs and the eager reference: same kernels, same bits
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def llama(layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, pad_token_id=0, **SMALL)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def prompts(batch, length=8, seed=1):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefilled(model, batch, max_cache_len=CACHE, ids=None, cache=None):
    if cache is None:
        cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.reset()
    with torch.no_grad():
        out = model(input_ids=prompts(batch) if ids is None else ids, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_decode_equals_eager_at_batch_1(dtype):
    model = llama(dtype=dtype)
    ids = prompts(1)
    dec = LLMDecoder(model, max_cache_len=CACHE, verify=2, progress=False).prewarm()
    tokens = dec.generate(ids, 40)
    assert torch.equal(tokens, greedy_eager(model, ids, 40, max_cache_len=CACHE))
    assert dec.stats.new_tokens == 40 and dec.stats.host_reads == 0 and dec.graphs.stats.verified == 2
    if dtype == torch.float32:                   # transformers' own static-cache generate agrees too
        hf = model.generate(ids, max_new_tokens=40, do_sample=False, cache_implementation="static",
                            eos_token_id=None, pad_token_id=0)
        assert torch.equal(tokens, hf[:, ids.shape[1]:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_buckets_equal_eager_per_batch(dtype):
    model = llama(dtype=dtype)
    dec = LLMDecoder(model, max_cache_len=CACHE, batch_sizes=(1, 2, 4), verify=1, progress=False).prewarm()
    assert sorted(k.batch for k in dec.graphs.keys) == [1, 2, 4] and dec.graphs.sealed
    for batch in (1, 2, 3, 4):
        ids = prompts(batch, seed=batch)
        assert torch.equal(dec.generate(ids, 32), greedy_eager(model, ids, 32, max_cache_len=CACHE)), batch
        assert dec.stats.bucket == {1: 1, 2: 2, 3: 4, 4: 4}[batch]
    assert dec.graphs.stats.captures == 3 and dec.graphs.stats.eager_fallbacks == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_disturb_no_real_row(dtype):
    """Three real rows in the batch-4 graph: their logits are bit-identical whatever the padded row
    holds (its token, its cache row)."""
    model = llama(dtype=dtype)
    g = graphrt.compile(model, buckets=graphrt.Buckets((2, 4), batch_args=("input_ids",)), progress=False)
    ids = prompts(4)
    runs, cache = [], None
    for pad_prompt in (ids[3], prompts(1, seed=9)[0]):
        cache, tok = prefilled(model, 4, ids=torch.cat([ids[:3], pad_prompt[None]]), cache=cache)
        tok = tok[:3]
        logits = []
        for _ in range(8):
            out = g(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
            assert out.shape[0] == 3                  # the padded row is cut from the outputs
            logits.append(out.clone())
            tok = out.argmax(-1, keepdim=True)
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])


def test_capture_leaves_no_trace_in_a_static_cache_argument():
    """The user's own loop: graphrt.compile(model), a StaticCache passed in, verify on. Capture (check,
    trace) and verify's rerun must leave the cache as one real step leaves it."""
    model = llama()
    cache, tok = prefilled(model, 1)
    twin, _ = prefilled(model, 1)
    g = graphrt.compile(model, verify=3, progress=False)
    for step in range(6):
        out = g(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:]
        with torch.no_grad():
            ref = model(input_ids=tok, past_key_values=twin, use_cache=True).logits[:, -1:]
        assert torch.equal(out, ref), step
        for a, b in zip(cache.layers, twin.layers):
            assert a.cumulative_length.item() == b.cumulative_length.item() == 9 + step
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        tok = out.argmax(-1)
    assert g.stats.captures == 1 and g.stats.verified == 3
    row = 2 * model.config.num_key_value_heads * 16 * 4                       # one K and one V row, fp32
    assert 0 < g.stats.undo_bytes <= model.config.num_hidden_layers * row + 64  # rows and positions, not the cache


def test_decode_with_inductor_equals_eager():
    model = llama(layers=1)
    ids = prompts(1)
    dec = LLMDecoder(model, max_cache_len=CACHE, inductor=True, progress=False).prewarm()
    assert torch.equal(dec.generate(ids, 32), greedy_eager(model, ids, 32, max_cache_len=CACHE))


def test_stop_tokens_pad_finished_rows_and_stop_early():
    model = llama()
    ids = prompts(2)
    ref = greedy_eager(model, ids, 48, max_cache_len=CACHE)
    stops = {int(ref[0, 5]), int(ref[1, 9])}      # each row meets one by its 6th / 10th token
    ends = [int(next(i for i, t in enumerate(ref[r].tolist()) if t in stops)) + 1 for r in range(2)]
    dec = LLMDecoder(model, max_cache_len=CACHE, batch_sizes=(2,), stop_tokens=sorted(stops), check_every=4,
                  progress=False).prewarm()
    out = dec.generate(ids, 48)
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end], ref[row, :end])
        assert (out[row, end:] == 0).all()        # pad_token_id after its stop token
    assert out.shape[1] == -(-max(ends) // 4) * 4  # stopped at the first check after the last row finished
    assert dec.stats.host_reads == out.shape[1] // 4


def test_hybrid_family_goes_through_the_same_path():
    """LFM2: short-conv layers (LinearAttentionLayer states) between static attention layers."""
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2, **SMALL)
    model = transformers.Lfm2ForCausalLM(cfg).eval()
    ids = prompts(2)
    dec = LLMDecoder(model, max_cache_len=CACHE, batch_sizes=(1, 2), verify=2, progress=False).prewarm()
    assert {type(layer).__name__ for layer in dec.cache.layers} == {"LinearAttentionLayer", "StaticLayer"}
    assert torch.equal(dec.generate(ids, 32), greedy_eager(model, ids, 32, max_cache_len=CACHE))
    assert torch.equal(dec.generate(ids[:1], 32), greedy_eager(model, ids[:1], 32, max_cache_len=CACHE))


def test_sliding_window_and_dynamic_layouts_are_refused_with_the_reason():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_hidden_layers=2, sliding_window=16, **SMALL)
    model = transformers.MistralForCausalLM(cfg).eval()
    with pytest.raises(CacheError, match=r"StaticSlidingWindowLayer at layers \[0, 1\].*Python int"):
        LLMDecoder(model, max_cache_len=CACHE)
    cache, tok = prefilled(model, 1)
    length = cache.layers[0].cumulative_length_int
    with pytest.raises(CacheError, match="sliding_window=None"):
        graphrt.compile(model, progress=False)(input_ids=tok, past_key_values=cache, use_cache=True)
    assert cache.layers[0].cumulative_length_int == length
    llama_model = llama(layers=1)
    dynamic = transformers.DynamicCache(config=llama_model.config)
    with torch.no_grad():
        llama_model(input_ids=prompts(1), past_key_values=dynamic, use_cache=True)
    with pytest.raises(CacheError, match="DynamicLayer at layers \\[0\\]: it grows keys and values by concatenation"):
        graphrt.compile(llama_model, progress=False)(input_ids=tok, past_key_values=dynamic, use_cache=True)


def test_python_counter_in_a_cache_is_named_at_capture():
    """A cache graphrt does not know, with a Python position: refused at capture, state as found."""
    class Cache:
        def __init__(self):
            self.k = torch.zeros(16, 4)
            self.length = 3

    def step(x, cache):
        cache.k[cache.length] = x
        cache.length += 1
        return cache.k.sum(0)

    cache = Cache()
    with pytest.raises(RebindError, match=r"cache\.length: 3 -> 4"):
        graphrt.compile(step, progress=False)(torch.ones(4), cache)
    assert cache.length == 3 and not cache.k.any()


def test_rebinding_a_position_buffer_is_named_at_capture():
    class Model(torch.nn.Module):                 # gpt-fast style, with the classic mistake
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.zeros(16, 4))
            self.register_buffer("pos", torch.zeros(1, dtype=torch.long))

        def forward(self, x):
            self.k.index_copy_(0, self.pos, x)
            self.pos = self.pos + 1
            return self.k.sum(0)

    m = Model()
    with pytest.raises(RebindError, match=r"Model\.pos") as e:
        graphrt.compile(m, progress=False)(torch.ones(1, 4))
    assert "self.pos.add_(1)" in str(e.value)
    assert m.pos.item() == 0 and not m.k.any()


def test_verify_names_the_state_a_frozen_value_spoils():
    """Outputs agree, the cache does not: verify compares what the eager rerun wrote."""
    cache = torch.zeros(8, 4)
    slots = iter(range(8))

    def step(x):
        cache[next(slots)] = x                    # a host value, frozen by the graph
        return x * 2

    g = graphrt.compile(step, verify=1, check=False, progress=False)
    g(torch.ones(4))
    with pytest.raises(graphrt.ReplayMismatchError, match=r"cache"):
        g(torch.ones(4))


def test_wrong_batch_past_the_cache_and_swapped_cache_are_clear_errors():
    model = llama(layers=1)
    g = graphrt.compile(model, progress=False)
    cache, tok = prefilled(model, 1, max_cache_len=10)
    with pytest.raises(InputError, match=r"past_key_values holds 1 row\(s\), but this call runs 2"):
        g(input_ids=tok.repeat(2, 1), past_key_values=cache, use_cache=True)
    g(input_ids=tok, past_key_values=cache, use_cache=True)
    other, _ = prefilled(model, 1, max_cache_len=10)
    with pytest.raises(SignatureError, match="another StaticCache object than the one"):
        g(input_ids=tok, past_key_values=other, use_cache=True)
    assert g.stats.captures == 1
    dec = LLMDecoder(model, max_cache_len=16, batch_sizes=(1, 2), progress=False)
    with pytest.raises(CacheError, match="past the cache"):
        dec.generate(prompts(1, length=8), 10)    # 8 + 10 - 1 = 17 positions > 16
    with pytest.raises(InputError, match="does not fit the batch buckets"):
        dec.generate(prompts(3), 4)
    with pytest.raises(InputError, match="max_cache_len"):
        LLMDecoder(model, max_cache_len=1)
    assert dec.generate(prompts(2, length=8), 9).shape == (2, 9)   # exactly 16 positions: fits
    tok = dec.start(prompts(1), 2)
    tok = dec.step(tok)
    with pytest.raises(CacheError, match="a step past the request"):
        dec.step(tok)


def test_a_cache_whose_tensors_were_rebound_is_refused_with_the_path():
    """reorder_cache (beam search) assigns new keys/values to every layer: the graph would go on
    writing the old ones. The next call names the rebound tensor; an in-place reorder replays exactly."""
    model = llama(layers=1)
    cache, tok = prefilled(model, 2, max_cache_len=16)
    twin, _ = prefilled(model, 2, max_cache_len=16)
    g = graphrt.compile(model, progress=False)
    beam = torch.tensor([1, 0])
    for _ in range(2):
        out = g(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:]
        with torch.no_grad():
            ref = model(input_ids=tok, past_key_values=twin, use_cache=True).logits[:, -1:]
        assert torch.equal(out, ref)
        for c in (cache, twin):                  # the reorder a graph can follow: in place
            for layer in c.layers:
                layer.keys.copy_(layer.keys.index_select(0, beam))
                layer.values.copy_(layer.values.index_select(0, beam))
        tok = ref.argmax(-1)[beam]
    cache.reorder_cache(beam)
    with pytest.raises(SignatureError, match=r"(?s)replaced since bucket.*past_key_values\.layers\[0\]\.keys: a "
                                             r"tensor.*compile again"):
        g(input_ids=tok, past_key_values=cache, use_cache=True)
    assert g.stats.captures == 1 and g.stats.replays == 2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    """Real CUDA graphs: warm-ups on the side stream leave no trace, the capture itself runs no kernel,
    and every bucket's replays equal the eager loop token for token."""
    model = llama(dtype=dtype).cuda()
    dec = LLMDecoder(model, max_cache_len=CACHE, batch_sizes=(1, 2, 4), backend="cuda-graph", verify=1,
                  progress=False).prewarm()
    assert dec.graphs.runtime.backend == "cuda-graph"
    for batch in (1, 3):
        ids = prompts(batch).cuda()
        assert torch.equal(dec.generate(ids, 32), greedy_eager(model, ids, 32, max_cache_len=CACHE)), batch
    assert 0 < dec.graphs.stats.undo_bytes < 1 << 16


@pytest.mark.cuda
def test_cuda_graph_of_the_user_loop_leaves_the_cache_as_found():
    model = llama().cuda()
    cache, tok = prefilled(model, 1, ids=prompts(1).cuda())
    twin, _ = prefilled(model, 1, ids=prompts(1).cuda())
    g = graphrt.compile(model, backend="cuda-graph", verify=2, progress=False)
    for step in range(4):
        out = g(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:]
        with torch.no_grad():
            ref = model(input_ids=tok, past_key_values=twin, use_cache=True).logits[:, -1:]
        assert torch.equal(out, ref), step
        assert cache.layers[0].cumulative_length.item() == twin.layers[0].cumulative_length.item() == 9 + step
        tok = out.argmax(-1)


def test_the_old_decoder_name_is_a_deprecated_alias():
    import graphrt.llm

    with pytest.warns(DeprecationWarning, match="LLMDecoder"):
        assert graphrt.llm.Decoder is LLMDecoder
    with pytest.raises(AttributeError):
        graphrt.llm.NoSuchThing
