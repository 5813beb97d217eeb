"""surgery.ops.bottleneck: the adapter function, its port (W_down·P_in, P_out·W_up) and bridge restrict/lift."""

import pytest
import torch

from surgery.ops.bottleneck import (activation, adapter, lift_bottleneck, port_bottleneck, restrict_bottleneck,
                                    site_output, site_sublayer)

D_SLM, D_LLM, R = 16, 40, 4


def rand_weights(d, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_down": torch.randn(r, d, generator=g), "b_down": torch.randn(r, generator=g),
            "W_up": torch.randn(d, r, generator=g), "b_up": torch.randn(d, generator=g)}


def by_hand(z, w, act):
    # Houlsby et al. 2019: z + W_up σ(W_down z + b_down) + b_up, written out independently of the op
    return z + act(z @ w["W_down"].T + w["b_down"]) @ w["W_up"].T + w["b_up"]


def embedding(d_llm, d_slm, seed=1):
    """E [d_llm, d_slm]: SLM coordinate j sits at LLM coordinate idx[j] (x_llm = E x_slm)."""
    idx = torch.randperm(d_llm, generator=torch.Generator().manual_seed(seed))[:d_slm]
    return torch.eye(d_llm)[:, idx], idx


@pytest.mark.parametrize("act_name", ["relu", "swish", "gelu_new", "tanh"])
def test_adapter_is_the_houlsby_formula(act_name):
    w, act = rand_weights(D_SLM, R), activation(act_name)
    z = torch.randn(2, 5, D_SLM)
    assert torch.allclose(adapter(z, w["W_down"], w["b_down"], w["W_up"], w["b_up"], act), by_hand(z, w, act), atol=1e-6)


@pytest.mark.parametrize("d_llm", [D_SLM, D_LLM])  # a permutation, then an embedding into a wider space
def test_port_with_selection_maps_computes_the_same_function_on_embedded_inputs(d_llm):
    w, act = rand_weights(D_SLM, R), activation("swish")
    E, _ = embedding(d_llm, D_SLM)
    # P_in maps LLM -> SLM coordinates (Eᵀ), P_out maps SLM -> LLM coordinates (E)
    p = port_bottleneck(w["W_down"], w["b_down"], w["W_up"], w["b_up"], E.T, E)
    assert p["W_down"].shape == (R, d_llm) and p["W_up"].shape == (d_llm, R) and p["b_up"].shape == (d_llm,)
    z = torch.randn(3, 7, D_SLM)
    assert torch.allclose(by_hand(z @ E.T, p, act), by_hand(z, w, act) @ E.T, atol=1e-6)
    # both AdapterHub wirings (Houlsby reads h, Pfeiffer reads x + h) commute with the embedding too
    h, x = torch.randn(3, 7, D_SLM), torch.randn(3, 7, D_SLM)
    for olnb in (False, True):
        got = site_output(h @ E.T, x @ E.T, p, act, original_ln_before=olnb)
        assert torch.allclose(got, site_output(h, x, w, act, original_ln_before=olnb) @ E.T, atol=1e-5)


def test_port_with_orthonormal_columns_and_the_wrong_direction():
    w, act = rand_weights(D_SLM, R), activation("relu")
    Q, _ = torch.linalg.qr(torch.randn(D_LLM, D_SLM, generator=torch.Generator().manual_seed(3)))
    p = port_bottleneck(w["W_down"], w["b_down"], w["W_up"], w["b_up"], Q.T, Q)
    z = torch.randn(4, D_SLM)
    assert torch.allclose(by_hand(z @ Q.T, p, act), by_hand(z, w, act) @ Q.T, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        port_bottleneck(w["W_down"], w["b_down"], w["W_up"], w["b_up"], Q, Q.T)  # maps swapped


def test_sublayer_replacement_gives_the_site_output_and_zero_up_is_identity():
    w, act = rand_weights(D_SLM, R), activation("relu")
    h, x = torch.randn(2, 3, D_SLM), torch.randn(2, 3, D_SLM)
    for olnb in (False, True):
        for rbln in (False, True):
            for olna in (False, True):
                kw = dict(original_ln_before=olnb, residual_before_ln=rbln, original_ln_after=olna, scaling=0.5)
                assert torch.allclose(x + site_sublayer(h, x, w, act, **kw), site_output(h, x, w, act, **kw), atol=1e-5)
    zero = {**w, "W_up": torch.zeros_like(w["W_up"]), "b_up": torch.zeros_like(w["b_up"])}
    for olnb in (False, True):
        assert torch.equal(site_sublayer(h, x, zero, act, original_ln_before=olnb), h)


def test_restrict_then_lift_round_trips():
    old = rand_weights(D_LLM, R, seed=5)
    kept = sorted(torch.randperm(D_LLM, generator=torch.Generator().manual_seed(6))[:D_SLM].tolist())
    old_br = restrict_bottleneck(old, kept, kept)
    assert old_br["W_down"].shape == (R, D_SLM) and old_br["W_up"].shape == (D_SLM, R)
    # no update: the LLM adapter comes back bit for bit
    same = lift_bottleneck(old, old_br, old_br, kept, kept)
    assert all(torch.equal(same[k], old[k]) for k in old)
    new_br = {k: v + 0.1 * torch.randn_like(v) for k, v in old_br.items()}
    lifted = lift_bottleneck(old, old_br, new_br, kept, kept)
    back = restrict_bottleneck(lifted, kept, kept)
    assert all(torch.equal(back[k], new_br[k]) for k in new_br)
    dropped = sorted(set(range(D_LLM)) - set(kept))
    assert torch.equal(lifted["W_down"][:, dropped], old["W_down"][:, dropped])
    assert torch.equal(lifted["W_up"][dropped], old["W_up"][dropped]) and torch.equal(lifted["b_up"][dropped], old["b_up"][dropped])


def test_restricted_adapter_computes_the_kept_coordinates():
    w, act = rand_weights(D_LLM, R, seed=7), activation("swish")
    kept = list(range(0, D_LLM, 3))
    br = restrict_bottleneck(w, kept, kept)
    z = torch.zeros(2, D_LLM)
    z[:, kept] = torch.randn(2, len(kept))  # an input the bridge can represent
    assert torch.allclose(by_hand(z, w, act)[:, kept], by_hand(z[:, kept], br, act), atol=1e-6)


def test_adapter_dropout_acts_in_training_only():
    from surgery.ops.bottleneck import bottleneck

    w, act = rand_weights(D_SLM, R), activation("relu")
    z = torch.randn(8, D_SLM)
    args = (z, w["W_down"], w["b_down"], w["W_up"], w["b_up"], act, 2.0)
    full = bottleneck(*args)
    assert torch.equal(bottleneck(*args, dropout=0.5, training=False), full)
    torch.manual_seed(0)
    dropped = bottleneck(*args, dropout=0.5, training=True)
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1 and torch.allclose(dropped[kept], 2 * full[kept])  # inverted dropout
