"""The decoder itself on sharp weights: KV-cache decoding, hidden states, logical axes, remat, bf16 and
sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as fx
from casa_jax.model.config import TextConfig
from casa_jax.model.kv_cache import KVCache
from casa_jax.parity import compare
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM, init_inputs

CFG = TextConfig(vocab_size=61, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=5,
                 num_key_value_heads=1, mrope_section=(1, 2, 1), rope_theta=1e4)
IDS = np.array([[5, 9, 2, 7, 3, 8, 1, 4], [0, 0, 0, 6, 2, 9, 3, 7]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int32)


@pytest.fixture(scope="module")
def model_and_params():
    model = CausalLM(CFG)
    variables = model.init(jax.random.key(1), *init_inputs())
    return model, variables


@pytest.fixture(scope="module")
def full_forward(model_and_params):
    """Sharp params (peaked attention, logits of O(1-10)): a cache or position slip cannot hide."""
    model, variables = model_and_params
    params = fx.sharp_params(CFG, seed=1)
    assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(variables["params"]))
    fwd = jax.jit(lambda p, i, pos, m: model.apply({"params": p}, i, pos, m, hidden_layers=(0, 1, 3)))
    return params, fwd(params, IDS, positions_from_mask(MASK), MASK)


@pytest.mark.parametrize("decode_offset", [0, 1])
def test_kv_cache_decoding_equals_full_recompute(model_and_params, full_forward, decode_offset):
    """Prefill + single steps equal the full forward; with the steps' positions one too far (a
    negative control) they do not."""
    model, _ = model_and_params
    params, full = full_forward
    positions = positions_from_mask(MASK)
    step = jax.jit(lambda p, i, pos, m, c: model.apply({"params": p}, i, pos, m, cache=c))
    cache = KVCache.for_config(CFG, batch=2, max_length=12)
    pieces = []
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):  # a prefill chunk, then one token at a time
        offset = decode_offset if start else 0
        out = step(params, IDS[:, start:end], positions[:, start:end] + offset, MASK[:, start:end], cache)
        cache = out.cache
        pieces.append(out.logits)
    incremental = np.concatenate(pieces, axis=1)
    real = MASK.astype(bool)
    expected = np.asarray(full.logits)[real]
    diff = np.abs(incremental[real] - expected).max()
    assert (diff <= 1e-5 * np.abs(expected).max()) == (decode_offset == 0), diff
    assert int(cache.index) == 8 and np.array_equal(np.asarray(cache.valid[:, :8]), real)
    assert np.abs(expected).max() >= 4  # sharp logits


def test_hidden_states_layout(full_forward):
    params, full = full_forward
    assert full.hidden_states.shape == (3, 2, 8, CFG.hidden_size)
    emb = np.asarray(params["embed_tokens"]["embedding"])[IDS]
    np.testing.assert_array_equal(np.asarray(full.hidden_states[0]), emb)


def test_every_parameter_has_logical_axes(model_and_params):
    _, variables = model_and_params
    specs = nn.get_partition_spec(variables)["params"]
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    named = {jax.tree_util.keystr(path): tuple(spec) for path, spec in flat}
    assert named["['embed_tokens']['embedding']"] == ("vocab", "embed")
    assert named["['layers']['self_attn']['q_proj']['kernel']"] == ("layers", "embed", "q_heads", "head_dim")
    assert named["['layers']['self_attn']['k_proj']['bias']"] == ("layers", "kv_heads", "head_dim")
    assert named["['layers']['self_attn']['o_proj']['kernel']"] == ("layers", "q_heads", "head_dim", "embed")
    assert named["['layers']['mlp']['down_proj']['kernel']"] == ("layers", "mlp", "embed")
    assert named["['layers']['input_layernorm']['scale']"] == ("layers", "norm")
    assert named["['lm_head']['kernel']"] == ("embed", "vocab")
    for name, spec in named.items():
        assert spec and all(axis is not None for axis in spec), name


def test_remat_and_bf16_policies(model_and_params, full_forward):
    params, full = full_forward
    positions = positions_from_mask(MASK)
    remat = CausalLM(CFG.replace(remat_policy="dots_with_no_batch_dims"))
    out = jax.jit(lambda p: remat.apply({"params": p}, IDS, positions, MASK).logits)(params)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full.logits), atol=1e-6)
    # gradients flow through the rematerialised scan
    loss = lambda p: jnp.mean(remat.apply({"params": p}, IDS, positions, MASK).logits ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert np.isfinite(np.asarray(grads["layers"]["mlp"]["up_proj"]["kernel"])).all()
    bf16 = CausalLM(CFG.replace(dtype="bfloat16"))
    out16 = jax.jit(lambda p: bf16.apply({"params": p}, IDS, positions, MASK))(params)
    assert out16.final_hidden.dtype == jnp.bfloat16 and out16.logits.dtype == jnp.float32
    _, kl, _ = compare(np.asarray(full.logits), np.asarray(out16.logits), MASK)
    print(f"bf16 compute vs fp32: mean KL {kl:.2e}")
    assert kl <= 2e-3, kl  # bf16 rounding only (DESIGN "Tolerances": parity bf16 <= 1e-3 against bf16)


def test_sharded_forward_on_8_device_mesh_matches(model_and_params, full_forward):
    from casa_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings
    assert jax.device_count() == 8
    model, _ = model_and_params
    params, full = full_forward
    mesh = make_mesh((2, 2, 2))
    shardings = param_shardings(model, mesh, *init_inputs())
    sharded = jax.device_put(params, shardings)
    P = jax.sharding.PartitionSpec
    assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    # one KV head and a vocabulary of 61 cannot split over tensor=2: those dimensions are replicated
    assert sharded["layers"]["self_attn"]["k_proj"]["kernel"].sharding.spec == P(None, "fsdp", None, None)
    assert sharded["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(DEFAULT_RULES)):
        out = jax.jit(lambda p, i, pos, m: model.apply({"params": p}, i, pos, m).logits)(
            sharded, IDS, positions_from_mask(MASK), MASK)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full.logits), atol=1e-5)


def test_input_validation(model_and_params, full_forward):
    model, _ = model_and_params
    params, _ = full_forward
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params}, None, positions_from_mask(MASK), MASK)
    with pytest.raises(ValueError, match="out of range"):
        model.apply({"params": params}, IDS, positions_from_mask(MASK), MASK, hidden_layers=(4,))


def test_heads_major_attention_equals_grouped_attention():
    """The prefill's heads-major attention gives grouped_attention's output (to float32 rounding) and, through
    its custom VJP, exactly its gradients. Negative controls: query heads paired with the wrong key/value head,
    or the padding mask dropped, are caught by the same comparison."""
    from casa_jax.model.attention import attention_mask_bias, grouped_attention, heads_major_attention
    b, t, kv_heads, groups, d = 2, 12, 2, 3, 8
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, kv_heads, groups, d)) * 2.0
    k = jax.random.normal(kk, (b, t, kv_heads, d)) * 2.0
    v = jax.random.normal(kv, (b, t, kv_heads, d))
    valid = np.ones((b, t), bool)
    valid[1, :4] = False  # left padding
    slots = jnp.arange(t)
    mask = attention_mask_bias(slots, slots, jnp.asarray(valid))
    scale = jnp.asarray(d ** -0.5, jnp.float32)
    ref, out = grouped_attention(q, k, v, mask, scale), jax.jit(heads_major_attention)(q, k, v, mask, scale)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    cot = jax.random.normal(kg, ref.shape)
    grads = [jax.grad(lambda *x: jnp.sum(f(*x, mask, scale) * cot), argnums=(0, 1, 2))(q, k, v)
             for f in (grouped_attention, heads_major_attention)]
    for ours, expected in zip(grads[1], grads[0]):
        np.testing.assert_array_equal(ours, expected)
    wrong_pairing = heads_major_attention(q[:, :, ::-1], k, v, mask, scale)[:, :, ::-1]
    unmasked = heads_major_attention(q, k, v, attention_mask_bias(slots, slots, jnp.ones((b, t), bool)), scale)
    for bad in (wrong_pairing, unmasked):
        assert np.abs(np.asarray(bad) - np.asarray(ref)).max() > 1e-2
